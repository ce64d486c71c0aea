"""The README stays true: its recipe reference is generated from the schema, and it documents
every command and exit code the CLI has."""

import subprocess
import sys
from pathlib import Path

from incr_cli.cli.app import app
from incr_cli.errors import EXIT_FAILURE, EXIT_LOCKED, EXIT_REJECTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_recipe_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_recipe_reference.py"), "--check",
                             str(ROOT / "README.md")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_names_every_command():
    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:  # type: ignore[attr-defined]
        assert f"incr {name}" in README, f"README does not document `incr {name}`"


def test_readme_lists_every_exit_code():
    for code in (EXIT_FAILURE, EXIT_USAGE, EXIT_REJECTED, EXIT_LOCKED):
        assert f"| {code} |" in README
    assert f"| {EXIT_SIGINT} / {EXIT_SIGTERM} |" in README


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_readme_experiment_tables_are_the_committed_results():
    """The tables the README discusses are the ones `make experiment` wrote to results/."""
    results = (ROOT / "results" / "experiment.md").read_text(encoding="utf-8")
    rows = [line for line in results.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) >= 14  # two tables: a header and six strategies each
    block = README[README.index("### The forgetting experiment"):README.index("<!-- strategies:end -->")]
    missing = [row for row in rows if row not in block.splitlines()]
    assert not missing, f"README's experiment tables differ from results/experiment.md: {missing[:2]}"


def _readme_tables():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_tables
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return readme_tables


def test_readme_tables_are_rendered_from_the_committed_results():
    """Every `<!-- table:NAME -->` block is what scripts/readme_tables.py renders from its results
    file, each file is committed (tracked by git), and every table of TABLES is in the README."""
    rt = _readme_tables()
    rendered, names = rt.render(README)
    assert rendered == README, "README's tables differ from results/: run python scripts/readme_tables.py"
    assert sorted(names) == sorted(rt.TABLES)
    tracked = subprocess.run(["git", "ls-files", *[f for f, _ in rt.TABLES.values()]], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(tracked) == sorted(f for f, _ in rt.TABLES.values()), "a results file is not committed"


def test_a_readme_figure_that_its_file_does_not_hold_fails_the_check():
    rt = _readme_tables()
    match = next(rt.BLOCK.finditer(README))
    body = match["body"]
    digit = next(i for i, ch in enumerate(body) if ch.isdigit() and i > body.index("\n"))
    edited = README.replace(body, body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:], 1)
    assert rt.render(edited)[0] != edited  # one digit changed by hand: the rendering puts it back
