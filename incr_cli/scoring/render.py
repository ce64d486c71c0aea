"""Rendering an EvalResult: tables of the version x increment matrix and its summaries, and a plot.

Tables go through a reporter's ``table`` (rich on a terminal, aligned plain text otherwise). The
plot needs matplotlib, the optional ``plot`` extra; it is drawn on a bare ``Figure`` with the Agg
canvas, so no global pyplot state or display is involved.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from incr_cli.errors import UsageError
from incr_cli.progress import Reporter
from incr_cli.scoring.result import EvalResult
from incr_cli.store.files import atomic_write_bytes

PLOT_EXTRA_HINT = "install the plot extra: pip install 'incr-cli[plot]'"
METRICS = {  # metric -> (table title, higher is better)
    "perplexity": ("perplexity (lower is better)", False),
    "accuracy": ("masked-token accuracy, top-1 (higher is better)", True),
}
MARK_TRAINED = "*"


def fmt(metric: str, value: float | None) -> str:
    """A score as shown in tables: perplexity with 2-3 significant decimals, accuracy in percent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric in ("accuracy", "top5"):
        return f"{100 * value:.1f}%"
    if math.isinf(value):
        return "inf"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"


def _signed(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}pp" if metric == "accuracy" else f"{value:+.2f}"


def row_label(result: EvalResult, version: str) -> str:
    info = next(i for i in result.versions if i.version == version)
    tags = [t for t, on in (("LATEST", version == result.latest), (info.status, info.status == "rejected"),
                            ("pruned", info.pruned)) if on]
    return f"{version} ({', '.join(tags)})" if tags else version


def matrix_table(result: EvalResult, metric: str) -> tuple[str, list[str], list[list[str]]]:
    """(title, columns, rows) of one metric: versions as rows, columns as in the result.

    A cell is marked ``*`` when the version's lineage was trained on that increment, and is bold
    (on a terminal) when the version itself trained on it. A cell scored on part of the masked
    positions (the version lacks tokens the increment's tokenizer revision added) says which share.
    """
    title, _ = METRICS[metric]
    columns = ["version", *[c.id for c in result.columns]]
    rows = []
    partial = False
    for info in result.versions:
        cells = [row_label(result, info.version)]
        for col in result.columns:
            text = fmt(metric, result.value(info.version, col.id, metric))
            coverage = result.value(info.version, col.id, "coverage")
            if coverage is not None and coverage < 1:
                text += f" ({coverage:.0%})"
                partial = True
            if col.id in info.trained_on:
                text += MARK_TRAINED
            if col.id in info.new:
                text = f"[bold]{text}[/bold]"
            cells.append(text)
        rows.append(cells)
    note = "; (N%) = share of the masked positions the version's vocabulary can score" if partial else ""
    return f"{title}; {MARK_TRAINED} = trained on{note}", columns, rows


def summary_table(result: EvalResult) -> tuple[str, list[str], list[list[str]]]:
    """(title, columns, rows): final average, average forgetting, BWT and FWT per metric."""
    columns = ["metric", "final average", "avg forgetting", "BWT", "FWT"]
    rows = []
    notes = {s.fwt_note for s in result.summaries.values() if s.fwt_note}
    for metric, s in result.summaries.items():
        rows.append([metric, fmt(metric, s.final_average), _signed(metric, s.average_forgetting),
                     _signed(metric, s.bwt), "n/a*" if s.fwt_note else _signed(metric, s.fwt)])
    lineage = " -> ".join(result.lineage)
    note = "".join(f"; * FWT n/a: {n}" for n in sorted(notes))
    return (f"continual-learning summaries over {lineage}; forgetting > 0 = forgot, BWT/FWT > 0 = helped{note}",
            columns, rows)


def forgetting_table(result: EvalResult) -> tuple[str, list[str], list[list[str]]] | None:
    """(title, columns, rows) per increment of the lineage: who learned it, forgetting, transfer."""
    incs = result.increment_columns()
    learned_by = result.learned_by
    ppl, acc = result.summaries.get("perplexity"), result.summaries.get("accuracy")
    if ppl is None or acc is None:
        return None
    rows = []
    for j, d in enumerate(incs):
        values = (ppl.forgetting[j], acc.forgetting[j], ppl.backward[j], ppl.forward[j])
        if all(v is None for v in values) and d not in learned_by:
            continue
        rel = ppl.forgetting_relative[j]
        rows.append([d, learned_by.get(d, "-"),
                     _signed("perplexity", ppl.forgetting[j]) + ("" if rel is None else f" ({rel:+.1%})"),
                     _signed("accuracy", acc.forgetting[j]), _signed("perplexity", ppl.backward[j]),
                     _signed("perplexity", ppl.forward[j])])
    if not rows:
        return None
    return ("per increment; forgetting (ppl) = final minus best perplexity since learned (relative to that best)",
            ["increment", "learned by", "forgetting (ppl)", "forgetting (acc)",
                              "BWT (ppl)", "FWT (ppl)"], rows)


def drift_table(result: EvalResult) -> tuple[str, list[str], list[list[str]]] | None:
    """(title, columns, rows): each version's embedding drift from its parent, as training recorded it."""
    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = []
    for version, d in result.drift.items():
        per = [(v["mean_cosine"], inc) for inc, v in d["increments"].items() if v.get("mean_cosine") is not None]
        low = min(per) if per else None
        rows.append([version, d["parent"], num(d["all"]["mean_cosine"]), num(d["all"]["neighbour_overlap"]),
                     f"{low[0]:.3f} ({low[1]})" if low else "-", str(d["all"]["n"])])
    if not rows:
        return None
    k = next(iter(result.drift.values()))["all"].get("k", 10)
    return (f"embedding drift from the parent (held-out sequences, {next(iter(result.drift.values()))['pooling']} "
            "pooling): cosine 1 = unchanged; re-index when it falls (see docs/serving.md)",
            ["version", "parent", "mean cosine", f"neighbour overlap@{k}", "lowest increment", "sequences"], rows)


def task_cell(scores: dict[str, Any] | None) -> str:
    """A task's main score with its 95% interval: "71.2% [69.6, 72.7]" (accuracy) or "0.412 [0.39, 0.43]" (MRR)."""
    if not scores:
        return "-"
    if scores.get("kind") == "retrieval":
        lo, hi = scores["mrr_ci"]
        return f"{scores['mrr']:.3f} [{lo:.3f}, {hi:.3f}] R@1 {100 * scores['recall@1']:.1f}%"
    lo, hi = scores["accuracy_ci"]
    return f"{100 * scores['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] F1 {100 * scores['macro_f1']:.1f}"


def task_table(result: EvalResult) -> tuple[str, list[str], list[list[str]]] | None:
    """(title, columns, rows): each version's score on each downstream task (versions as rows)."""
    names = list(dict.fromkeys(t for per in result.tasks.values() for t in per))
    if not names:
        return None
    rows = [[row_label(result, info.version), *[task_cell(result.tasks.get(info.version, {}).get(t)) for t in names]]
            for info in result.versions]
    return ("downstream tasks (higher is better): classification = accuracy of a linear probe [95% bootstrap "
            "interval] and macro-F1; retrieval = MRR [interval] and recall@1", ["version", *names], rows)


def task_summary_table(result: EvalResult) -> tuple[str, list[str], list[list[str]]] | None:
    if not result.task_summary:
        return None
    rows = [[name, s["metric"], f"{s['first']:.3f} ({s['first_version']})", f"{s['best']:.3f} ({s['best_version']})",
             f"{s['final']:.3f} ({s['final_version']})", f"{s['change']:+.3f}", f"{s['drop_from_best']:+.3f}"]
            for name, s in result.task_summary.items()]
    return (f"tasks over {' -> '.join(result.lineage)}: drop from best > 0 = the line lost what it had",
            ["task", "metric", "first", "best", "final", "change", "drop from best"], rows)


def render(result: EvalResult, reporter: Reporter) -> None:
    """All tables of an eval, in reading order."""
    for metric in METRICS:
        reporter.table(*matrix_table(result, metric))
    for table in (task_table(result), task_summary_table(result)):
        if table is not None:
            reporter.table(*table)
    if result.increment_columns():
        reporter.table(*summary_table(result))
        per = forgetting_table(result)
        if per is not None:
            reporter.table(*per)
    drift = drift_table(result)
    if drift is not None:
        reporter.table(*drift)


# ----------------------------------------------------------------------------- plot


def require_matplotlib() -> Any:
    """The matplotlib package, or a UsageError naming the extra to install."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from None
    return matplotlib


def plot(result: EvalResult, path: Path | str, metric: str = "perplexity") -> Path:
    """Write a PNG: a heatmap of ``metric`` (versions x columns, trained cells marked) and one line
    per column across versions. -> the path written (atomically)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: the folder {path.parent} does not exist")
    versions = [i.version for i in result.versions]
    columns = [c.id for c in result.columns]
    values = [[_nan(result.value(v, c, metric)) for c in columns] for v in versions]  # (V, C)

    fig = Figure(figsize=(max(8.0, 4.0 + 1.4 * len(columns)), max(4.0, 2.0 + 0.5 * len(versions))),
                 layout="constrained")
    FigureCanvasAgg(fig)
    heat, lines = fig.subplots(1, 2, width_ratios=[max(len(columns), 1), 2 + 0.3 * len(columns)])
    finite = [x for row in values for x in row if math.isfinite(x) and x > 0]
    higher = METRICS[metric][1]
    log_scale = metric == "perplexity" and finite and max(finite) / min(finite) > 10
    norm = LogNorm(min(finite), max(finite)) if log_scale else None
    image = heat.imshow(values, aspect="auto", cmap="viridis" if higher else "viridis_r", norm=norm)
    fig.colorbar(image, ax=heat)
    heat.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    heat.set_yticks(range(len(versions)), labels=versions)
    heat.set_title(f"{metric} (* = trained on)")
    for i, info in enumerate(result.versions):
        for j, c in enumerate(columns):
            mark = MARK_TRAINED if c in info.trained_on else ""
            heat.text(j, i, fmt(metric, values[i][j]) + mark, ha="center", va="center", fontsize=8,
                      color=_ink(image, values[i][j]))

    for j, c in enumerate(columns):
        (line,) = lines.plot(range(len(versions)), [row[j] for row in values], marker="o", label=c)
        learner = result.learned_by.get(c)
        if learner in versions:  # a star where the increment was trained on
            k = versions.index(learner)
            lines.plot([k], [values[k][j]], marker="*", markersize=14, color=line.get_color())
    lines.set_xticks(range(len(versions)), labels=versions, rotation=30, ha="right")
    lines.set_ylabel(metric)
    if log_scale:
        lines.set_yscale("log")
    lines.set_title("per increment (star: trained by)")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _ink(image: Any, value: float) -> str:
    """Black or white text, whichever reads better on the cell's colour."""
    if not math.isfinite(value):
        return "black"
    r, g, b, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
