"""Weight averaging with the parent (WiSE-FT, Wortsman et al. 2022): after an increment trains, its
weights are pulled back toward the version it started from,

    theta = weight * theta_trained + (1 - weight) * theta_parent,

at no inference cost. ``merge.weight`` fixes the weight (1 = no averaging, the default);
``merge.choose`` picks it on held-out data: of 1.0, 0.9, ... down to ``merge.weight``, the one with
the lowest objective, half the mean held-out loss of the new increments and half that of the earlier
ones (each increment counts once within its half), so a long lineage does not outvote the new text.

Any strategy can be merged: this runs after the one training loop, on the trained student, before
the version is scored, gated and written. Rows a grown vocabulary added (the parent has none) keep
their trained values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GRID_STEP = 0.1


def candidate_weights(lowest: float) -> list[float]:
    """1.0, 0.9, ... down to ``lowest`` (included, also when it is off the grid), highest first."""
    grid, k = [], 0
    while (w := round(1.0 - k * GRID_STEP, 6)) > lowest + 1e-9:
        grid.append(w)
        k += 1
    return [*grid, round(lowest, 6)]


def objective(losses: dict[str, float | None], new: list[str]) -> float | None:
    """Half the mean held-out loss of the ``new`` increments plus half that of the others (the earlier
    ones); one half alone when the other has no score; None when nothing was scored."""
    halves = [[v for d, v in losses.items() if (d in new) == is_new and v is not None] for is_new in (True, False)]
    means = [sum(h) / len(h) for h in halves if h]
    return sum(means) / len(means) if means else None


def interpolate_(model: nn.Module, trained: dict[str, torch.Tensor], parent: dict[str, torch.Tensor],
                 weight: float) -> None:
    """In place: each parameter of ``model`` = weight * trained + (1 - weight) * parent, over the rows
    the parent has (a grown embedding's new rows keep ``trained``'s values)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(trained[name])
            if name not in parent:
                continue
            old = parent[name].to(param.device, param.dtype)
            rows = tuple(slice(0, n) for n in old.shape)
            param[rows].mul_(weight).add_(old, alpha=1.0 - weight)


@dataclass
class MergeRecord:
    """What metrics.json says of the averaging (``merge``)."""

    weight: float  # the weight the version was written with
    chosen: bool  # picked on held-out data (merge.choose), else fixed
    objective: dict[str, float | None] = field(default_factory=dict)  # candidate weight -> objective
    losses: dict[str, dict[str, float | None]] = field(default_factory=dict)  # candidate -> increment -> loss
    selected_on: str = ""  # which held-out rows the choice was scored on

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "chosen": self.chosen, "objective": self.objective,
                "losses": self.losses, "selected_on": self.selected_on}


def merge_with_parent(model: nn.Module, parent: dict[str, torch.Tensor], *, weight: float, choose: bool,
                      new: list[str], losses_now: Callable[[], dict[str, float | None]]) -> MergeRecord:
    """Average ``model`` (trained) with ``parent``'s parameters in place and say how.

    ``choose``: score every candidate weight with ``losses_now`` (held-out loss per increment of the
    model as it is now) and keep the best objective (ties: the higher weight, less averaging)."""
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    if not choose:
        interpolate_(model, trained, parent, weight)
        return MergeRecord(weight, False)
    record = MergeRecord(1.0, True)
    best: tuple[float, float] | None = None
    for w in candidate_weights(weight):
        interpolate_(model, trained, parent, w)
        losses = losses_now()
        score = objective(losses, new)
        record.objective[f"{w:g}"], record.losses[f"{w:g}"] = score, losses
        if score is not None and (best is None or score < best[0] - 1e-12):
            best = (score, w)
    record.weight = best[1] if best else 1.0
    interpolate_(model, trained, parent, record.weight)
    return record
