"""The experiment's outputs: the markdown tables and the per-domain plot (matplotlib, Agg).

Input is the experiment's JSON document: {settings, strategies: {name: {versions, increments,
learned_at, perplexity: {matrix, final_average, average_forgetting, bwt, new_domain, ...},
accuracy: {...}, train_seconds: [s2, s3]}}}.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any


def _num(x: float | None, digits: int = 2, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}%"


def _cell(doc: dict[str, Any], name: str, key: str, fmt: Any) -> str | None:
    """One summary: the seed's value, or "mean ± std" over the seeds (``doc["spread"]``)."""
    stats = doc.get("spread", {}).get(name, {}).get(key)
    if stats is None or len(stats["values"]) < 2:
        return None
    return f"{fmt(stats['mean'])} ± {fmt(stats['std']).lstrip('+')}"


def markdown(doc: dict[str, Any]) -> str:
    """Settings line, the summary table, and final perplexity per domain (mean ± std over the seeds
    when there are several)."""
    s = doc["settings"]
    seeds = s.get("seeds", [0])
    r = s["recipe"]
    t = r["train"]
    m = s["machine"]
    domains = " -> ".join(s["domains"])
    lines = [
        "# Continual-learning strategies on one stream of three domains",
        "",
        f"Base `{s['base']}`; stream {domains} (samples/); {s['steps_per_increment']} steps per increment "
        f"(joint: k x {s['steps_per_increment']} at its k-th domain, retraining all from v0000); "
        f"batch {t['batch_size']}, seq {r['model']['max_seq_len']}, lr {t['lr']:g} ({t['schedule']}, warm-up "
        f"{t['warmup_ratio']:g}), " + (f"seeds {', '.join(map(str, seeds))} (train.seed; tables: mean ± sample std)"
                                       if len(seeds) > 1 else f"seed {seeds[0]}") + "; distill alpha "
        f"{r['distill']['alpha']:g} T {r['distill']['temperature']:g} on the {r['distill'].get('rows', 'all')} rows; "
        f"replay ratio {r['replay']['ratio']:g} weight {r['replay']['weight']:g}"
        f"{' on top of the new rows' if r['replay'].get('on_top') else ''}; ewc weight {r['ewc']['weight']:g}, "
        f"{r['ewc']['fisher_batches']} Fisher batches; eval: the first {r['eval']['max_sequences']} held-out "
        f"sequences per domain, masks seeded ({r['eval']['seed']}). Increment 1 ({s['domains'][0]}) is shared: "
        f"one {s['shared_first_increment']} fine-tune from v0000 ({s['shared_seconds']:.0f} s). "
        f"{m['cores']} CPU cores, torch threads {m['torch_threads']}, torch {m['torch']}; whole run "
        f"{s['total_seconds'] / 60:.1f} min." + (" **--quick: a tiny scratch model, not a result.**" if s["quick"] else ""),
        "",
        "| strategy | final avg ppl ↓ | final avg acc ↑ | avg forgetting (ppl) ↓ | BWT (ppl) ↑ | "
        "avg forgetting (acc pts) ↓ | new-domain ppl ↓ | train time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, res in doc["strategies"].items():
        ppl, acc = res["perplexity"], res["accuracy"]
        cells = [(f"perplexity.{k}", ppl[k], (lambda x, sg=sg: _num(x, signed=sg))) for k, sg in
                 (("final_average", False),)]
        cells += [("accuracy.final_average", acc["final_average"], _pct)]
        cells += [(f"perplexity.{k}", ppl[k], (lambda x: _num(x, signed=True))) for k in ("average_forgetting", "bwt")]
        cells += [("accuracy.average_forgetting", acc["average_forgetting"], (lambda x: _pct(x, signed=True))),
                  ("perplexity.new_domain", ppl["new_domain"], _num),
                  ("train_seconds", sum(res["train_seconds"]), (lambda x: f"{x:.0f}"))]
        lines.append(f"| {name} | " + " | ".join(_cell(doc, name, key, fmt) or fmt(value)
                                                for key, value, fmt in cells) + " |")
    lines += [
        "",
        "Final average: mean over the three domains of the last version's held-out perplexity / accuracy. "
        "Forgetting (Chaudhry et al., 2018): per earlier domain, the last version's distance from the best "
        "the lineage did on it after learning it, positive = forgot. BWT (Lopez-Paz & Ranzato, 2017): last "
        "version minus the version that learned the domain, positive = later training helped. New-domain "
        "ppl: perplexity on pydocs and fortunes right after the increment that learned each (plasticity). "
        "Train time: the two increments each strategy trained itself, wall clock, evaluation inside "
        "train-increment included.",
        "",
        "Final held-out perplexity per domain (last version):",
        "",
        "| strategy | " + " | ".join(s["domains"]) + " |",
        "| --- |" + " ---: |" * len(s["domains"]),
    ]
    for name, res in doc["strategies"].items():
        last = res["perplexity"]["matrix"][-1]
        lines.append(f"| {name} | " + " | ".join(_cell(doc, name, f"final_perplexity.{d}", _num) or _num(x)
                                                for d, x in zip(res["increments"], last)) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path:
    """One panel per domain: held-out perplexity after each increment, one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    domains = doc["settings"]["domains"]
    fig = Figure(figsize=(4.2 * len(domains), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for j, (ax, domain) in enumerate(zip(axes, domains)):
        for name, res in doc["strategies"].items():
            rows = res["perplexity"]["matrix"][1:]  # v0000's untrained head would flatten the scale
            ys = [math.nan if row[j] is None else row[j] for row in rows]
            ax.plot(range(1, len(rows) + 1), ys, marker="o", label=name)
        ax.axvline(j + 1, color="grey", alpha=0.3, linewidth=6)  # where this domain is learned
        ax.set_xticks(range(1, len(domains) + 1), labels=[f"+{d}" for d in domains])
        ax.set_yscale("log")
        ax.set_title(f"held-out perplexity on {domain}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity (log)")
    axes[-1].legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    path.write_bytes(buffer.getvalue())
    return path
