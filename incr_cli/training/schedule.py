"""The learning-rate schedule: linear warm-up, then cosine, linear or constant decay.

A pure function of the step, so resuming needs no scheduler state: the loop sets each step's rate
from the step counter it already saves.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length: ``warmup_ratio`` of the steps, rounded, at most all of them."""
    return min(total_steps, round(total_steps * warmup_ratio))


def lr_factor(step: int, *, total_steps: int, warmup: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly to 1 at its last step ((step + 1) / warmup, so no step has a zero rate);
    after it the factor decays from 1 towards ``min_lr_ratio``: cosine or linear over the remaining
    steps, or stays at 1 ("constant").
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)  # 0 at the first decay step
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"train.schedule: {schedule!r} is not one of cosine, linear, constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
