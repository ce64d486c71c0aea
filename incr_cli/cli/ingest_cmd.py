"""`incr ingest`: turn text files into the workspace's next data increment."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from incr_cli.cli.output import JsonOpt, Output, guarded
from incr_cli.store.workspace import Workspace

_OVERRIDE_RE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_]+=")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """PATH... and trailing ``section.key=value`` overrides share the arguments: an item that looks
    like an override and is not an existing path is one."""
    paths, overrides = [], []
    for item in items:
        (overrides if _OVERRIDE_RE.match(item) and not os.path.lexists(item) else paths).append(item)
    return paths, overrides


def ingest_cmd(
    workspace: Annotated[Path, typer.Argument(help="Workspace directory.", show_default=False)],
    paths: Annotated[list[str] | None, typer.Argument(
        help="Files, directories (read recursively, sorted; a Hugging Face datasets folder as its Arrow files), globs, "
             "or - for standard input; .gz, .bz2, .xz and .zst are decompressed. "
             "Recipe overrides section.key=value may follow.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", help="Increment name (default: the first path's stem).")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="auto (by name: jsonl for *.jsonl/*.json, csv for *.csv, tsv for *.tsv/*.tab, parquet "
                         "for *.parquet, arrow for *.arrow; else by content, else lines), lines (one document "
                         "per line), paragraphs (blank-line separated), jsonl, csv or tsv (a header row, then "
                         "one document a row), parquet or arrow (a column). gzip, bzip2, xz and zstd are read "
                         "whatever the name.")] = "auto",
    text_field: Annotated[str, typer.Option(
        "--text-field", help="JSON Lines: the field holding the text; CSV, TSV, Parquet, Arrow: the column.")] = "text",
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe file (default: WORKSPACE/recipe.yaml).")] = None,
    allow_unknown: Annotated[bool, typer.Option(
        "--allow-unknown", help="Ingest even when more than data.unknown_max of the tokens are unknown ([UNK]) "
                                "or of the characters map to no token.")] = False,
    extend_vocab: Annotated[int | None, typer.Option(
        "--extend-vocab", metavar="N", min=0,
        help="Add up to N of the increment's most frequent words that the tokenizer cuts into several pieces "
             "(or maps to [UNK]) as new tokens (default: vocab.max_new_tokens).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --extend-vocab: print the words that would be added; write nothing.")] = False,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", metavar="NAME[:CONFIG]",
        help="A dataset in the local Hugging Face cache (the datasets library's or the Hub's), read offline; "
             "incr never downloads it.")] = None,
    split: Annotated[str, typer.Option("--split", help="With --dataset: the split to read.")] = "train",
    json_out: JsonOpt = False,
) -> None:
    """Clean, deduplicate, split (held-out by document hash), tokenize and pack PATH... into data/dNNNN-NAME/.

    Exact duplicates of documents ingested before, in any increment, are dropped; ingesting the same
    files again writes nothing. Bad input (invalid UTF-8, binary, empty, unreadable or missing files,
    malformed, too deeply nested or over-long JSON lines, over-long lines) is skipped or cut, and counted
    in the summary and manifest with the first lines where it was found.
    """
    from incr_cli import api

    out = Output(json_out)
    ws = Workspace.open(workspace)
    paths, overrides = split_overrides(paths or [])
    result = api.ingest(ws.root, paths, name=name, fmt=fmt, text_field=text_field, overrides=overrides,
                        recipe=recipe, reporter=out, allow_unknown=allow_unknown, extend_vocab=extend_vocab,
                        dry_run=dry_run, dataset=dataset, split=split)
    if json_out:
        out.emit_json({"workspace": str(ws.root), **result.to_dict()})
        return
    _render(out, ws, result, dry_run)


def _render(out: Output, ws: Workspace, result: Any, dry_run: bool) -> None:
    """What ingest did, for a person: the vocabulary tables, the summary, the next command."""
    if result.increment is None and not result.sources and not result.skipped:
        out.log(result.message)  # the early no-op: nothing was read
        return
    if result.vocab.get("added") or dry_run:
        _vocab_tables(out, result.vocab)
    if dry_run:
        out.log(result.message)
        return
    out.table(result.increment or "nothing written", ["", ""], _summary_rows(result))
    out.log(result.message)
    if result.increment:
        out.log(f"next: incr train-increment {shlex.quote(str(ws.root))}")


def _summary_rows(result: Any) -> list[list[str]]:
    """The rows of ingest's summary table (an IngestResult)."""
    docs = result.documents
    rows = [["documents kept", f"{docs.get('kept', 0):,} ({docs.get('train', 0):,} train, {docs.get('heldout', 0):,} held out)"],
            ["duplicates dropped", f"{docs.get('duplicate', 0):,}" + _where(result.duplicates_in)]]
    rows += [[f"rejected: {reason}", f"{n:,}{_at(docs.get('rejected_at', {}).get(reason, []), n)}"]
             for reason, n in docs.get("rejected", {}).items()]
    if docs.get("cut_long"):
        rows.append(["cut to data.max_doc_chars", f"{docs['cut_long']:,}"])
    rows += [[f"skipped files: {reason}", f"{info['count']:,}{_at(info['examples'], info['count'])}"]
             for reason, info in result.skipped.items()]
    rows.append(["source files", f"{len(result.sources):,} ({result.bytes_read / 1e6:,.1f} MB)"])
    if result.increment:
        seqs, toks = result.sequences, result.tokens
        rows += [["sequences", f"{seqs['train']:,} train, {seqs['heldout']:,} held out"],
                 ["tokens", f"{toks['train']:,} train, {toks['heldout']:,} held out"],
                 ["unknown", _unknown_row(result.unknown)]]
        if result.segmenter:
            rows.append(["Chinese words", f"segmented by {result.segmenter} (masking.whole_word)"])
    rate = result.bytes_read / 1e6 / result.seconds if result.seconds else 0.0
    rows.append(["time", f"{result.seconds:.1f} s ({rate:.1f} MB/s)"])
    return rows


def _vocab_tables(out: Output, report: dict[str, Any]) -> None:
    """The words added (or, on a dry run, that would be), and tokens per document before and after."""
    added = report.get("added") or []
    rows = [[escape(a["word"]), f"{a['frequency']:,}", f"{len(a['pieces'])} -> 1", escape(" ".join(a["pieces"]))]
            for a in added]
    title = f"new tokens: {len(added)} of {report.get('candidates', 0)} candidates ({report.get('requested', 0)} asked)"
    out.table(title, ["word", "frequency", "tokens", "pieces before"], rows)
    tokens = report.get("tokens")
    if tokens:
        out.table("tokens per document", ["split", "documents", "before", "after"],
                  [[split, f"{t['documents']:,}", f"{t['per_document_before']}", f"{t['per_document_after']}"]
                   for split, t in tokens.items() if t["documents"]])


def _unknown_row(unknown: dict) -> str:
    return (f"{unknown.get('unknown_share', 0):.2%} of tokens [UNK], "
            f"{unknown.get('dropped_share', 0):.2%} of characters dropped")


def _at(examples: list[str], n: int) -> str:
    """ " (a.jsonl:3, a.jsonl:9, ...)": where the first rejected documents are."""
    return f" ({', '.join(map(escape, examples[:2]))}{', ...' if n > 2 else ''})" if examples else ""


def _where(counts: dict[str, int]) -> str:
    return f" (already in {', '.join(counts)})" if counts else ""


def register(app: typer.Typer) -> None:
    """Add `incr ingest` to the app."""
    app.command("ingest")(guarded(ingest_cmd))
