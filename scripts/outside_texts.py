"""Texts from outside ../shared for checking a default on shifts it was not chosen on (issue 31):
the machine's own Debian changelogs, Python standard-library docstrings and manual pages.

    python scripts/outside_texts.py OUT_DIR [--docs 800]

Writes OUT_DIR/01-austen.txt (the shipped excerpt: the line's first increment, which trains
MiniLM's MLM head), 02-changelogs.txt, 03-docstrings.txt and 04-manpages.txt, one document a line,
``--docs`` each, drawn with a fixed seed; ``scripts/stream.py --texts OUT_DIR`` trains them in that order.
What is on the machine decides the text (Debian packages' own files: their licenses allow this use;
nothing is shipped in the project).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_ROFF_ESCAPE = re.compile(r"\\f\[[A-Z]*\]|\\f[BIRP]|\\f\(..|\\\(..|\\\[[a-z]+\]|\\[-e&|^]|\\s[+-]?\d")
_CHANGELOG_HEADER = re.compile(r"^\S+ \([^)]*\) [^;]*; urgency=\S+$")


def changelogs(limit: int) -> list[str]:
    """Each Debian changelog entry's bullet text, joined into one document."""
    docs = []
    for path in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        for entry in re.split(r"\n -- [^\n]*\n", text):
            body = " ".join(line.strip().lstrip("*-+ ").strip() for line in entry.splitlines()
                            if line.strip() and not _CHANGELOG_HEADER.match(line.strip()))
            if len(body) > 40:
                docs.append(body)
    return docs


def docstrings(limit: int) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (one a document)."""
    docs = []
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 60:
                    docs.append(" ".join(doc.split()))
    return docs


def manpages(limit: int) -> list[str]:
    """Paragraphs of section 1 and 8 manual pages, roff requests and escapes removed."""
    docs = []
    for path in sorted([*Path("/usr/share/man/man1").glob("*.gz"), *Path("/usr/share/man/man8").glob("*.gz")]):
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        para: list[str] = []
        for line in text.splitlines() + [".PP"]:
            if line.startswith((".", "'")):
                if line[:3] in (".PP", ".SH", ".TP", ".IP", ".LP", ".P") or line.startswith(".SH"):
                    body = _ROFF_ESCAPE.sub("", " ".join(para)).strip()
                    if len(body) > 80:
                        docs.append(" ".join(body.split()))
                    para = []
                continue
            para.append(line)
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--docs", type=int, default=800)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    austen = (REPO / "samples" / "austen.txt").read_text(encoding="utf-8").splitlines()
    (args.out / "01-austen.txt").write_text("\n".join(austen[:900]) + "\n", encoding="utf-8")
    for i, (name, read) in enumerate((("changelogs", changelogs), ("docstrings", docstrings),
                                      ("manpages", manpages)), start=2):
        docs = list(dict.fromkeys(read(args.docs)))
        random.Random(i).shuffle(docs)
        if len(docs) < args.docs // 2:
            raise SystemExit(f"outside_texts: only {len(docs)} {name} documents on this machine")
        (args.out / f"{i:02d}-{name}.txt").write_text("\n".join(docs[:args.docs]) + "\n", encoding="utf-8")
        print(f"{name}: {min(len(docs), args.docs)} of {len(docs)} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
