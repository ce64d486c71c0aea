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
    domains = first["domains"]
    lines = list(dict.fromkeys(name for s in seeds for name in s["lines"]))
    batch_tokens = first["batch_size"] * first["seq_len"]
    # a retrain on all K domains so far spends as many steps as the line has until then
    joint_at = [(first["first_steps"] + first["steps"] * (k - 1)) * batch_tokens for k in range(1, len(domains) + 1)]
    summary: dict[str, Any] = {}
    for name in lines:
        runs = [s for s in seeds if name in s["lines"]]  # a line may have run with fewer seeds
        final = np.array([[s["lines"][name]["perplexity"][-1][i] for i in range(len(domains))] for s in runs])
        summary[name] = {"final": final.mean(axis=0).tolist(), "seeds": [s["seed"] for s in runs],
                         "geomean_per_seed": [geomean(row) for row in final.tolist()],
                         "compute": float(np.mean([first_compute(s) + sum(i["compute"] for i in s["lines"][name]
                                                                           ["increments"]) for s in runs])),
                         "last_increment_compute": float(np.mean([s["lines"][name]["increments"][-1]["compute"]
                                                                  for s in runs])),
                         "train_seconds": float(np.mean([s["first_seconds"] + sum(
                             i["train_seconds"] for i in s["lines"][name]["increments"]) for s in runs])),
                         "task": _mean_task([s["lines"][name].get("task") for s in runs]),
                         "first_shift": _first_shift(runs, name)}
    for name, row in summary.items():
        row["geomean"] = geomean(row["final"])
        joint, naive = _reference(seeds, "joint", row["seeds"]), _reference(seeds, "naive", row["seeds"])
        if joint:
            ratios = [a / b for a, b in zip(row["final"], joint)]
            row["vs_joint"] = ratios
            row["geomean_vs_joint"] = row["geomean"] / geomean(joint)
            worst = int(np.argmax(ratios[:-1]))
            row["worst_earlier_vs_joint"], row["worst_earlier"] = ratios[worst], domains[worst]
        if naive:
            row["newest_vs_naive"] = row["final"][-1] / naive[-1]
        plain = summary.get("naive", {}).get("first_shift")
        if plain and row.get("first_shift") and name not in ("naive", "joint"):
            f, p_ = row["first_shift"], plain
            row["first_shift_vs_naive"] = {"forgetting": f["forgetting"] / p_["forgetting"] if p_["forgetting"] else None,
                                           "new": f["new"] / p_["new"]}
        row["increment_vs_nightly_joint"] = row["last_increment_compute"] / joint_at[-1] if name != "joint" else None
    return {"domains": domains, "summary": summary, "nightly_joint_compute": float(sum(joint_at)),
            "joint_at": joint_at, "seeds_raw": seeds}


def _first_shift(runs: list[dict[str, Any]], name: str) -> dict[str, float] | None:
    """The single shift at the line's second increment (v0001 -> v0002), mean over the seeds: the first
    domain's perplexity increase (forgetting) and the second domain's perplexity after it (plasticity)."""
    rows = [s["lines"][name]["perplexity"] for s in runs]
    if name == "joint" or any(len(r) < 2 for r in rows):
        return None
    return {"forgetting": float(np.mean([r[1][0] - r[0][0] for r in rows])), "new": float(np.mean([r[1][1] for r in rows]))}


def _reference(seeds: list[dict[str, Any]], name: str, numbers: list[int]) -> list[float] | None:
    """The mean final perplexity per domain of line ``name`` over the seeds ``numbers`` (those a line ran
    with: every ratio compares runs of the same seeds); None unless it ran with all of them."""
    runs = [s for s in seeds if s["seed"] in numbers and name in s["lines"]]
    if len(runs) != len(numbers):
        return None
    return np.mean([s["lines"][name]["perplexity"][-1] for s in runs], axis=0).tolist()


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
             "| line | overrides | seeds | geo-mean ppl ↓ | vs joint (≤ 1.05) | worst earlier vs joint (≤ 1.15) | newest vs naive "
             "(≤ 1.10) | last increment vs nightly joint (≤ 0.33) | compute (M tokens) | train s | task acc ↑ |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in s.items():
        over = ", ".join(settings.get("lines", {}).get(name, [])) if name != "joint" else "strategy.name=joint"
        worst = (f"{_met(row.get('worst_earlier_vs_joint'), 'worst_earlier_vs_joint')} ({row.get('worst_earlier')})"
                 if name != "joint" and row.get("worst_earlier_vs_joint") is not None else "–")
        task = f"{row['task']:.1%}" if row.get("task") is not None else "–"
        ivj = row.get("increment_vs_nightly_joint")
        spread = np.std(row["geomean_per_seed"], ddof=1) if len(row["seeds"]) > 1 else None
        geo = f"{row['geomean']:.1f}" + (f" ± {spread:.1f}" if spread is not None else "")
        lines.append(f"| {name} | {over or _as_pinned(raw['recipe'])} | {len(row['seeds'])} | {geo} | "
                     f"{_met(row.get('geomean_vs_joint'), 'geomean_vs_joint') if name != 'joint' else '1.00x'} | "
                     f"{worst} | {_met(row.get('newest_vs_naive'), 'newest_vs_naive')} | "
                     f"{f'{ivj:.2f}x' if ivj is not None else '–'} | {row['compute'] / 1e6:.2f} | "
                     f"{row['train_seconds']:.0f} | {task} |")
    lines += ["", "Geo-mean: the geometric mean over the domains of the final version's held-out perplexity (mean "
              "over the seeds of the per-domain perplexity; ± the sample spread of the per-seed geo-means); "
              "ratios are of those means.", "", f"Compute: student tokens (forward + backward) plus a third of the tokens the teacher ran forward "
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
    shift = [(n, r) for n, r in s.items() if r.get("first_shift_vs_naive")]
    if shift:
        lines += ["", f"The single shift inside the line ({domains[0]} -> {domains[1]}, v0001 -> v0002) against the plain "
                  "fine-tune's: the bars of a single shift are forgetting <= 0.3x naive's and new-domain perplexity "
                  "<= 1.10x naive's.", "", "| line | forgetting on the first domain (ppl points) | vs naive (<= 0.3) "
                  "| second domain's ppl | vs naive (<= 1.10) |", "| --- | ---: | ---: | ---: | ---: |"]
        for n, r in shift:
            f, v = r["first_shift"], r["first_shift_vs_naive"]
            forgot = "–" if v["forgetting"] is None else f"{v['forgetting']:.2f}x {'✓' if v['forgetting'] <= 0.3 else '✗'}"
            lines.append(f"| {n} | {f['forgetting']:+.1f} | {forgot} | {f['new']:.1f} | "
                         f"{v['new']:.2f}x {'✓' if v['new'] <= 1.10 else '✗'} |")
    lines += ["", *_replay_table(raw)]
    return "\n".join(lines) + "\n"


def _as_pinned(recipe: dict[str, Any]) -> str:
    """The recipe's own replay and schedule, for the line that changes nothing."""
    r, t, d = recipe["replay"], recipe["train"], recipe["distill"]
    return (f"the recipe's: replay.ratio={r['ratio']:g}, replay.weight={r['weight']:g}, distill.alpha={d['alpha']:g}, "
            f"train.schedule={t['schedule']}")


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
