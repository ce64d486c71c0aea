"""README's serving table from real runs: a compressed student's metrics.json and the embedding drift
that two lines recorded for the same increment (e.g. the demo's distill+replay and plain fine-tune).

    python scripts/serving_table.py --student WS2 [--drift NAME=WS:VERSION ...]

Prints Markdown tables (numbers as measured; nothing is computed here but ratios).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def student_table(ws: Path) -> str:
    m = _read(ws / "checkpoints" / "v0000" / "metrics.json")
    t, s = m["teacher"], m["student"]
    lines = [f"Teacher {t['version']} ({t['layers']} layers, hidden {t['hidden']}) -> student ({s['layers']} layers "
             f"from teacher layers {m['student_layers_from_teacher']}, hidden {s['hidden']}): {m['steps']} steps, "
             f"{m['tokens']:,} tokens, {m['train_seconds']:.0f} s of training on {m['device']} ({m['precision']}); "
             f"loss terms {', '.join(m['loss_terms'])}.", "",
             "| | teacher | student | student / teacher |", "| --- | ---: | ---: | ---: |"]

    def row(name: str, a: float, b: float, fmt: str) -> None:
        lines.append(f"| {name} | {a:{fmt}} | {b:{fmt}} | {b / a:.2f}x |")

    row("parameters", t["parameters"], s["parameters"], ",")
    row("weights on disk (MB)", t["weights_bytes"] / 1e6, s["weights_bytes"] / 1e6, ".1f")
    row("encoder inference tokens/s (CPU)", t["tokens_per_second"], s["tokens_per_second"], ",.0f")
    for inc, ts in m["eval"]["teacher"].items():
        ss = m["eval"]["student"][inc]
        row(f"{inc} held-out perplexity", ts["perplexity"], ss["perplexity"], ".1f")
        row(f"{inc} held-out accuracy (%)", 100 * ts["accuracy"], 100 * ss["accuracy"], ".1f")
    return "\n".join(lines)


def drift_table(specs: list[str]) -> str:
    lines = ["| line | version | mean cosine (all) | neighbour overlap@10 (all) | per increment: mean cosine / overlap |",
             "| --- | --- | ---: | ---: | --- |"]
    for spec in specs:
        name, _, where = spec.partition("=")
        ws, _, version = where.rpartition(":")
        d = _read(Path(ws) / "checkpoints" / version / "metrics.json")["embedding_drift"]
        per = "; ".join(f"{inc} {v['mean_cosine']:.3f} / {v['neighbour_overlap']:.3f}"
                        for inc, v in d["increments"].items())
        lines.append(f"| {name} | {version} vs {d['parent']} | {d['all']['mean_cosine']:.3f} | "
                     f"{d['all']['neighbour_overlap']:.3f} | {per} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path)
    parser.add_argument("--drift", nargs="*", default=[], help="NAME=WORKSPACE:VERSION")
    args = parser.parse_args()
    if args.student:
        print(student_table(args.student) + "\n")
    if args.drift:
        print(drift_table(args.drift))


if __name__ == "__main__":
    main()
