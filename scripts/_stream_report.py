"""Tables and the plot of `make stream` (scripts/stream.py), from its seeds' raw results.

Every figure is computed here from stream.json's raw matrices and step counts: the final held-out
perplexity per domain, its geometric mean, ratios to the joint retrain and to the plain fine-tune,
the targets of issue 31, and the compute of each line against a nightly joint retrain.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TARGETS = {"geomean_vs_joint": 1.05, "worst_earlier_vs_joint": 1.15, "newest_vs_naive": 1.10,
           "increment_vs_nightly_joint": 1 / 3}


def geomean(values: list[float]) -> float:
    return float(math.exp(np.mean(np.log(values))))


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' raw results -> {"seeds": raw, "summary": per line, averaged over the seeds}."""
    first = seeds[0]
    domains, lines = first["domains"], list(first["lines"])
    batch_tokens = first["batch_size"] * first["seq_len"]
    # a retrain on all K domains so far spends as many steps as the line has until then
    joint_at = [(first["first_steps"] + first["steps"] * (k - 1)) * batch_tokens for k in range(1, len(domains) + 1)]
    summary: dict[str, Any] = {}
    for name in lines:
        final = np.array([[s["lines"][name]["perplexity"][-1][i] for i in range(len(domains))] for s in seeds])
        summary[name] = {"final": final.mean(axis=0).tolist(),
                         "compute": float(np.mean([first_compute(s) + sum(i["compute"] for i in s["lines"][name]
                                                                           ["increments"]) for s in seeds])),
                         "last_increment_compute": float(np.mean([s["lines"][name]["increments"][-1]["compute"]
                                                                  for s in seeds])),
                         "train_seconds": float(np.mean([s["first_seconds"] + sum(
                             i["train_seconds"] for i in s["lines"][name]["increments"]) for s in seeds])),
                         "task": _mean_task([s["lines"][name].get("task") for s in seeds])}
    joint, naive = summary.get("joint"), summary.get("naive")
    for name, row in summary.items():
        row["geomean"] = geomean(row["final"])
        if joint:
            ratios = [a / b for a, b in zip(row["final"], joint["final"])]
            row["vs_joint"] = ratios
            row["geomean_vs_joint"] = row["geomean"] / geomean(joint["final"])
            worst = int(np.argmax(ratios[:-1]))
            row["worst_earlier_vs_joint"], row["worst_earlier"] = ratios[worst], domains[worst]
        if naive:
            row["newest_vs_naive"] = row["final"][-1] / naive["final"][-1]
        row["increment_vs_nightly_joint"] = row["last_increment_compute"] / joint_at[-1] if name != "joint" else None
    return {"domains": domains, "summary": summary, "nightly_joint_compute": float(sum(joint_at)),
            "joint_at": joint_at, "seeds_raw": seeds}


def first_compute(seed: dict[str, Any]) -> float:
    """The shared first increment (a plain fine-tune): counted in every sequential line, not in joint's."""
    return seed["first_steps"] * seed["batch_size"] * seed["seq_len"]


def _mean_task(tasks: list[dict[str, Any] | None]) -> float | None:
    values = [t["accuracy"] for t in tasks if t and t.get("accuracy") is not None]
    return float(np.mean(values)) if values else None


def _met(value: float | None, key: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x {'✓' if value <= TARGETS[key] else '✗'}"


def markdown(doc: dict[str, Any]) -> str:
    s, domains, settings = doc["summary"], doc["domains"], doc.get("settings", {})
    raw = doc["seeds_raw"][0]
    lines = [f"# A line of {len(domains)} domains: each method against a joint retrain", "",
             f"Base `{settings.get('base')}`; stream {' -> '.join(domains)} (documents per domain: "
             f"{', '.join(map(str, raw['docs']))}); first increment {raw['first_steps']} steps (shared, plain), then "
             f"{raw['steps']} per increment; joint: one retrain from v0000 on all {len(domains)} domains with "
             f"{raw['total_steps']} steps; batch {raw['batch_size']}, seq {raw['seq_len']}; recipe "
             f"`{settings.get('recipe_file')}` with {', '.join(settings.get('heldout', []))}; seeds "
             f"{settings.get('seeds')}; {settings.get('machine', {}).get('cores')} CPU cores, torch "
             f"{settings.get('machine', {}).get('torch')}; whole run {settings.get('total_seconds', 0) / 60:.1f} min.", "",
             "| line | overrides | geo-mean ppl ↓ | vs joint (≤ 1.05) | worst earlier vs joint (≤ 1.15) | newest vs naive "
             "(≤ 1.10) | last increment vs nightly joint (≤ 0.33) | compute (M tokens) | train s | task acc ↑ |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in s.items():
        over = ", ".join(settings.get("lines", {}).get(name, [])) if name != "joint" else "strategy.name=joint"
        worst = (f"{_met(row.get('worst_earlier_vs_joint'), 'worst_earlier_vs_joint')} ({row.get('worst_earlier')})"
                 if name != "joint" and row.get("worst_earlier_vs_joint") is not None else "–")
        task = f"{row['task']:.1%}" if row.get("task") is not None else "–"
        ivj = row.get("increment_vs_nightly_joint")
        lines.append(f"| {name} | {over or '(as shipped)'} | {row['geomean']:.1f} | "
                     f"{_met(row.get('geomean_vs_joint'), 'geomean_vs_joint') if name != 'joint' else '1.00x'} | "
                     f"{worst} | {_met(row.get('newest_vs_naive'), 'newest_vs_naive')} | "
                     f"{f'{ivj:.2f}x' if ivj is not None else '–'} | {row['compute'] / 1e6:.2f} | "
                     f"{row['train_seconds']:.0f} | {task} |")
    lines += ["", f"Compute: student tokens (forward + backward) plus a third of the tokens the teacher ran forward "
              f"on; sequential lines include the shared first increment. A nightly joint retrain (at each of the "
              f"{len(domains)} nights, one retrain on all domains so far with the line's steps until then) would "
              f"have spent {doc['nightly_joint_compute'] / 1e6:.2f} M tokens; the last one alone "
              f"{doc['joint_at'][-1] / 1e6:.2f} M.", "",
              "Final held-out perplexity per domain (last version; in brackets: ratio to joint):", "",
              "| line | " + " | ".join(domains) + " |", "| --- |" + " ---: |" * len(domains)]
    for name, row in s.items():
        cells = [f"{v:.1f}" + (f" ({r:.2f})" if name != "joint" and "vs_joint" in row else "")
                 for v, r in zip(row["final"], row.get("vs_joint", row["final"]))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *_replay_table(raw)]
    return "\n".join(lines) + "\n"


def _replay_table(raw: dict[str, Any]) -> list[str]:
    """Each earlier domain's expected share of the replayed rows at the last increment, per split rule."""
    out = []
    for name, line in raw["lines"].items():
        rows = line["increments"][-1].get("replay_rows") if line["increments"] else None
        if rows and line["increments"][-1].get("replay_split") and name in ("default", "split=increment"):
            total = sum(rows.values())
            out.append(f"| {name} ({line['increments'][-1]['replay_split']}) | "
                       + " | ".join(f"{v / total:.1%}" for v in rows.values()) + " |")
    if not out:
        return []
    k = len(raw["domains"]) - 1
    return [f"Share of the replayed rows each earlier domain gets at the last increment (K = {k}; K = 100 in "
            "tests/data/test_data.py):", "", "| rule | " + " | ".join(raw["domains"][:k]) + " |",
            "| --- |" + " ---: |" * k, *out]


def plot(doc: dict[str, Any], path: Any) -> None:
    """One panel per domain: its held-out perplexity after each increment, per line; joint dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    raw, domains = doc["seeds_raw"][0], doc["domains"]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(domains) / cols), cols, figsize=(16, 7), squeeze=False)
    for j, domain in enumerate(domains):
        ax = axes[j // cols][j % cols]
        for name, line in raw["lines"].items():
            values = [row[j] for row in line["perplexity"]]
            if name == "joint":
                ax.axhline(values[-1], color="black", linestyle="--", linewidth=1, label="joint (end)")
            else:
                ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
        ax.set_title(domain)
        ax.set_yscale("log")
        ax.set_xlabel("version")
    axes[0][0].set_ylabel("held-out perplexity")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
