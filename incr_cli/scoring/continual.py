"""Continual-learning summaries of a version x increment score matrix (pure numpy, no I/O).

The matrix ``R`` has one row per version of a lineage, oldest first (row 0 is the root of the
lineage, normally the base ``v0000``; the last row K is the final version), and one column per
data increment. ``R[i, j]`` is version i's held-out score on increment j: perplexity (lower is
better) or masked-token accuracy (higher is better). ``NaN`` marks a cell that was not scored.

``learned_at[j]`` is the row of the version that trained on increment j (the one whose manifest
lists j in ``new``), or -1 when no version of the lineage trained on it (still pending). Each
increment is learned once in a lineage, so the versions that have seen j are rows
``learned_at[j] .. K``.

Signs: every summary is oriented so that a reader never needs to remember which metric is
"lower is better". With ``s = +1`` for accuracy and ``s = -1`` for perplexity:

- **final average** = mean over the increments j seen by the final version (``learned_at[j] >= 0``)
  of ``R[K, j]``. In the metric's own units (a perplexity or an accuracy).
- **forgetting** of increment j (Chaudhry et al., 2018, restricted to versions that had learned j) =
  ``s * (best(R[l, j] for learned_at[j] <= l < K) - R[K, j])``, where best is max for accuracy and
  min for perplexity. Defined for j learned before the final version. **Positive = forgot**: how
  far the final version is below the best the lineage did on j after learning it (negative when
  the final version is the best yet). ``average forgetting`` is its mean over those j.
  ``forgetting_relative`` is the same divided by that best (perplexity: +0.05 = 5% above the best),
  the unit train-increment's ``forgetting`` uses against the parent.
- **backward transfer** BWT (Lopez-Paz & Ranzato, 2017) = mean over j learned before the final
  version of ``s * (R[K, j] - R[learned_at[j], j])``. **Positive = later training helped** the
  earlier increments, negative = it hurt them.
- **forward transfer** FWT (Lopez-Paz & Ranzato, 2017, with the root version as the reference in
  place of a random initialisation) = mean over j with ``learned_at[j] >= 2`` of
  ``s * (R[learned_at[j] - 1, j] - R[0, j])``: how much better the version trained just before j
  already was on j than the root version. **Positive = earlier increments helped** on data not yet
  seen. Increments learned by row 1 are left out: their "version before" is the root itself.
  When the root's MLM head was initialised at random (a scratch preset, or a base shipped without
  its head, like MiniLM) its scores are no reference: FWT is not computed (``summarize(...,
  reference=False)``) and ``fwt_note`` says why, rather than printing a transfer of thousands of
  perplexity points that only measures the head's training.

Terms that involve a NaN cell are left out of the means; a summary with no terms is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContinualSummary:
    """Summaries of one metric. Per-increment lists have one entry per column (None = undefined)."""

    final_average: float | None
    forgetting: list[float | None]
    forgetting_relative: list[float | None]
    backward: list[float | None]
    forward: list[float | None]
    average_forgetting: float | None
    bwt: float | None
    fwt: float | None
    fwt_note: str | None = None  # why FWT is not given, when the root is no reference

    def to_dict(self, columns: Sequence[str]) -> dict:
        """JSON form with per-increment values keyed by column name (undefined ones left out)."""
        def by_name(values: list[float | None]) -> dict[str, float]:
            return {c: v for c, v in zip(columns, values) if v is not None}

        return {"final_average": self.final_average, "average_forgetting": self.average_forgetting,
                "bwt": self.bwt, "fwt": self.fwt, "fwt_note": self.fwt_note, "forgetting": by_name(self.forgetting),
                "forgetting_relative": by_name(self.forgetting_relative),
                "backward": by_name(self.backward), "forward": by_name(self.forward)}


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _all_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


FWT_NO_REFERENCE = "the root version's MLM head was initialised at random: its scores are no reference for FWT"


def summarize(R: np.ndarray, learned_at: Sequence[int], *, higher_is_better: bool,
              reference: bool = True) -> ContinualSummary:
    """R (V, D) float (NaN = not scored), learned_at (D,) int (row that learned each column, -1 =
    not learned in this lineage) -> the summaries defined in this module's docstring. ``reference``:
    whether row 0 is a fair reference for forward transfer (False: FWT left out, with a note)."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"summarize: R must be (versions, increments), got shape {R.shape}")
    n_rows, n_cols = R.shape
    learned = [int(x) for x in learned_at]
    if len(learned) != n_cols:
        raise ValueError(f"summarize: learned_at has {len(learned)} entries for {n_cols} columns")
    if any(not -1 <= row < n_rows for row in learned):
        raise ValueError(f"summarize: learned_at rows must lie in [-1, {n_rows}), got {learned}")
    s = 1.0 if higher_is_better else -1.0
    final = n_rows - 1

    seen_final = [float(R[final, j]) for j in range(n_cols)
                  if learned[j] >= 0 and _all_finite(R[final, j])] if n_rows else []
    forgetting: list[float | None] = [None] * n_cols
    relative: list[float | None] = [None] * n_cols
    backward: list[float | None] = [None] * n_cols
    forward: list[float | None] = [None] * n_cols
    for j, row in enumerate(learned):
        if 0 <= row < final and _all_finite(R[final, j]):
            earlier = [float(R[i, j]) for i in range(row, final) if _all_finite(R[i, j])]
            if earlier:
                best = max(earlier) if higher_is_better else min(earlier)
                forgetting[j] = s * (best - float(R[final, j]))
                relative[j] = forgetting[j] / best if best > 0 else None
            if _all_finite(R[row, j]):
                backward[j] = s * (float(R[final, j]) - float(R[row, j]))
        if reference and row >= 2 and _all_finite(R[row - 1, j], R[0, j]):
            forward[j] = s * (float(R[row - 1, j]) - float(R[0, j]))
    return ContinualSummary(
        final_average=_mean(seen_final),
        forgetting=forgetting, forgetting_relative=relative, backward=backward, forward=forward,
        average_forgetting=_mean(forgetting), bwt=_mean(backward), fwt=_mean(forward),
        fwt_note=None if reference else FWT_NO_REFERENCE,
    )


# ----------------------------------------------------------------------------- gate lines


def gate_line(check: dict) -> str:
    """One gate check as every command and file words it (train-increment's log and failure line,
    TensorBoard's gate text). Perplexity checks use the held-out tables' sign convention: the change
    is after / before - 1, so -12.5% is a fall (better) and +3.0% a rise (forgetting)."""
    status = "ok" if check["passed"] else "FAILED"
    if check.get("message"):
        return f"{check['message']}: {status}"
    value, limit, where = check["value"], check["limit"], f"{check['check']} on {check['increment']}"
    if check["check"] == "max_forgetting":
        shown = "n/a" if value is None else f"{value:+.1%}"
        return f"{where}: held-out perplexity {shown}, allowed up to {limit:+.1%}: {status}"
    if check["check"] == "min_improvement":  # value is the improvement (-change); show the change
        shown = "n/a" if value is None else f"{-value:+.1%}"
        return f"{where}: held-out perplexity {shown}, must be {-limit:+.1%} or lower: {status}"
    if check["check"] == "max_embedding_drift":
        shown = "n/a" if value is None else f"{value:.4f}"
        return f"{where}: embedding drift (1 - mean cosine) {shown}, allowed up to {limit:.4f}: {status}"
    return f"{where}: {value} (limit {limit}): {status}"
