"""The learning-rate schedule: linear warm-up, then cosine, linear or constant decay, or warm-up,
a constant rate and a short linear decay at the end (``wsd``: warm-up, stable, decay).

Every increment is a run of its own, so each re-warms and re-decays (Ibrahim et al. 2024); ``wsd``
keeps the peak rate for most of the increment.

A pure function of the step, so resuming needs no scheduler state: the loop sets each step's rate
from the step counter it already saves.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length: ``warmup_ratio`` of the steps, rounded, at most all of them."""
    return min(total_steps, round(total_steps * warmup_ratio))


def decay_steps(total_steps: int, warmup: int, decay_ratio: float) -> int:
    """``wsd``'s decay length: ``decay_ratio`` of the steps, rounded, at least 1, within the steps after warm-up."""
    return max(1, min(total_steps - warmup, round(total_steps * decay_ratio)))


def lr_factor(step: int, *, total_steps: int, warmup: int, schedule: str, min_lr_ratio: float,
              decay: int = 1) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly to 1 at its last step ((step + 1) / warmup, so no step has a zero rate);
    after it the factor decays from 1 towards ``min_lr_ratio``: cosine or linear over the remaining
    steps, or stays at 1 ("constant"); ``wsd`` stays at 1 until the last ``decay`` steps, then decays
    linearly over them.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = total_steps - decay
        if step < start:
            return 1.0
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - min(1.0, (step - start) / max(1, decay)))
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)  # 0 at the first decay step
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"train.schedule: {schedule!r} is not one of cosine, linear, constant, wsd")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
