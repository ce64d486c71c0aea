"""Print, side by side, what two second increments kept of corpus 1 and learned of corpus 2.

    python scripts/demo_compare.py eval.json eval-naive.json

Both files are `incr eval --out` documents of workspaces that share v0000 and v0001 and differ only
in how v0002 was trained (distillation + replay vs a plain fine-tune).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def load(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cell(doc: dict, version: str, increment: str, metric: str) -> float:
    return doc["matrix"][version][increment][metric]


def task_rows(ours: dict, naive: dict) -> list[tuple[str, list[str]]]:
    """One row per downstream task of the recipe (eval.tasks): its main score for each version."""
    got = (ours.get("tasks") or {}).get("scores") or {}
    theirs = (naive.get("tasks") or {}).get("scores") or {}
    rows = []
    for task, first in (got.get("v0001") or {}).items():
        metric = "accuracy" if first["kind"] == "classification" else "mrr"
        shown = [f"{s[metric]:.3f}" if s else "-" for s in
                 (first, got.get("v0002", {}).get(task), theirs.get("v0002", {}).get(task))]
        rows.append((task, [metric, *shown]))
    return rows


def main(ours_path: str, naive_path: str) -> int:
    ours, naive = load(ours_path), load(naive_path)
    old, new = [c["id"] for c in ours["columns"] if c["kind"] == "increment"][:2]
    table = Table(title=f"second increment ({new}): what it kept of {old} and learned of {new}")
    for col in ("", "v0001 (after 1st)", "v0002 distill+replay", "v0002 plain fine-tune"):
        table.add_column(col, justify="right" if col else "left")
    rows = [
        (f"{old} perplexity", "perplexity", old, "{:.2f}"),
        (f"{old} accuracy", "accuracy", old, "{:.1%}"),
        (f"{new} perplexity", "perplexity", new, "{:.2f}"),
        (f"{new} accuracy", "accuracy", new, "{:.1%}"),
    ]
    for label, metric, inc, fmt in rows:
        table.add_row(label, fmt.format(cell(ours, "v0001", inc, metric)),
                      fmt.format(cell(ours, "v0002", inc, metric)), fmt.format(cell(naive, "v0002", inc, metric)))
    base = cell(ours, "v0001", old, "perplexity")
    forget_ours = cell(ours, "v0002", old, "perplexity") / base - 1
    forget_naive = cell(naive, "v0002", old, "perplexity") / base - 1
    table.add_row(f"forgetting on {old} (perplexity change)", "", f"{forget_ours:+.1%}", f"{forget_naive:+.1%}")
    for task, scores in task_rows(ours, naive):
        table.add_row(f"task {task} (probe {scores[0]})", *scores[1:])
    console = Console(width=max(Console().width, 110))
    console.print(table)
    verdict = "less" if forget_ours < forget_naive else "MORE"
    console.print(f"distillation + replay forgot {verdict} of {old} than the plain fine-tune "
                  f"({forget_ours:+.1%} vs {forget_naive:+.1%} perplexity).")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
