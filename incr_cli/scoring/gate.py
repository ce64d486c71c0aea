"""The gate's sample: which increments the promotion gate scores, within ``gate.max_increments``."""

from __future__ import annotations

from incr_cli.config.recipe import Recipe
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import stable_seed


def gate_sample(ws: Workspace, recipe: Recipe, pending: list[str], earlier: list[str]) -> list[str]:
    """The increments the gate scores, in lineage order: all of them while their held-out rows fit
    in ``eval.gate_sequences``; beyond it the pending ones, the newest earlier ones up to half the
    budget, and older ones in a fixed order seeded by ``eval.seed`` up to the other half (at least
    one of each).

    The choice is nested from one version to the next (an older increment chosen now was chosen by
    the parent too, or was new or recent then), so the parent's "after" scores always cover the
    "before" scores a child needs.
    """
    budget = recipe.eval.gate_sequences
    rows = {d: min(int((ws.increment_manifest(d).get("sequences") or {}).get("heldout", 0)),
                   recipe.eval.max_sequences) for d in [*pending, *earlier]}
    if budget is None or sum(rows.values()) <= budget:
        return [*earlier, *pending]
    half, recent, used = budget // 2, [], 0
    for d in reversed(earlier):
        if recent and used + rows[d] > half:
            break
        recent.append(d)
        used += rows[d]
    older, used = [], 0
    for d in sorted((d for d in earlier if d not in recent), key=lambda d: stable_seed(recipe.eval.seed, d, -1)):
        if older and used + rows[d] > half:
            break
        older.append(d)
        used += rows[d]
    chosen = set(recent) | set(older)
    return [d for d in earlier if d in chosen] + list(pending)
