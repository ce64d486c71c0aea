"""The docs stay true: README.md is a short tutorial whose links all resolve, the recipe reference
of docs/recipes.md is generated from the schema, the pages document every command and exit code the
CLI has, and every table of measured figures is rendered from the committed results file it came from."""

import re
import subprocess
import sys
from pathlib import Path

from incr_cli.cli.app import app
from incr_cli.errors import EXIT_FAILURE, EXIT_LOCKED, EXIT_REJECTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
DOCS = "\n".join(PAGES.values())
COMMANDS = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
MAX_README_LINES = 250


def test_readme_is_a_short_tutorial():
    lines = README.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move the reference to docs/"
    for step in ("pip install", "make install", "scratch:tiny", "make demo", "make test"):
        assert step in README, f"README.md lacks {step!r}"
    assert not re.search(r"\bissue \d+", DOCS), "development history belongs in the git log, not the docs"


def _links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]


def _anchors(text: str) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.*)$", text, flags=re.M)}


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page, text in PAGES.items():
        for link in _links(text):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)


def test_the_link_check_catches_a_missing_page(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](#nothing)\n")
    assert _links(page.read_text()) == ["missing.md", "#title", "#nothing"]
    assert "title" in _anchors(page.read_text()) and "nothing" not in _anchors(page.read_text())


def test_recipe_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_recipe_reference.py"), "--check",
                             str(ROOT / "docs" / "recipes.md")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_docs_name_every_command():
    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:  # type: ignore[attr-defined]
        assert f"incr {name}" in COMMANDS, f"docs/commands.md does not document `incr {name}`"


def test_the_docs_list_every_exit_code():
    for code in (EXIT_FAILURE, EXIT_USAGE, EXIT_REJECTED, EXIT_LOCKED):
        assert f"| {code} |" in COMMANDS
    assert f"| {EXIT_SIGINT} / {EXIT_SIGTERM} |" in COMMANDS


def test_experiment_tables_are_the_committed_results():
    """The tables docs/experiments.md discusses are the ones `make experiment` wrote to results/."""
    results = (ROOT / "results" / "experiment.md").read_text(encoding="utf-8")
    rows = [line for line in results.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 14  # two tables: a header and six strategies each
    page = PAGES[ROOT / "docs" / "experiments.md"]
    block = page[page.index("### The forgetting experiment"):page.index("<!-- strategies:end -->")]
    missing = [row for row in rows if row not in block.splitlines()]
    assert not missing, f"docs/experiments.md's tables differ from results/experiment.md: {missing[:2]}"


def _doc_tables():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import doc_tables
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return doc_tables


def test_doc_tables_are_rendered_from_the_committed_results():
    """Every `<!-- table:NAME -->` block is what scripts/doc_tables.py renders from its results
    file, each file is committed (tracked by git), and every table of TABLES is on some page."""
    rt = _doc_tables()
    names = []
    for page, text in PAGES.items():
        rendered, found = rt.render(text)
        assert rendered == text, f"{page.relative_to(ROOT)}: tables differ from results/: run python scripts/doc_tables.py"
        names += found
    assert sorted(names) == sorted(rt.TABLES)
    tracked = subprocess.run(["git", "ls-files", *[f for f, _ in rt.TABLES.values()]], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(tracked) == sorted(f for f, _ in rt.TABLES.values()), "a results file is not committed"


def test_a_figure_that_its_file_does_not_hold_fails_the_check():
    rt = _doc_tables()
    text = next(t for t in PAGES.values() if rt.BLOCK.search(t))
    body = next(rt.BLOCK.finditer(text))["body"]
    digit = next(i for i, ch in enumerate(body) if ch.isdigit() and i > body.index("\n"))
    edited = text.replace(body, body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:], 1)
    assert rt.render(edited)[0] != edited  # one digit changed by hand: the rendering puts it back


def test_every_file_path_the_docs_name_exists():
    named = set(re.findall(r"\b((?:tests|scripts|benchmarks|incr_cli|recipes)/[\w/.-]+\.(?:py|yaml|md|json))", DOCS))
    assert len(named) > 10
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"the docs name files that do not exist: {missing}"


def test_the_demo_time_readme_states_is_the_committed_run():
    """README's demo time is results/demo-run.json's (written by scripts/demo.sh at the end of make demo)."""
    import json

    run = json.loads((ROOT / "results" / "demo-run.json").read_text(encoding="utf-8"))
    stated = re.search(r"The demo takes about (\d+) minutes on (\d+) CPU cores", README)
    assert stated, "README.md should state the demo's time as results/demo-run.json measured it"
    assert (int(stated[1]), int(stated[2])) == (round(run["seconds"] / 60), run["cores"])
