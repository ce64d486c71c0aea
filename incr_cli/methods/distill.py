"""distill: MLM on the new rows plus logit distillation from the parent (the teacher), no replay."""

from __future__ import annotations

from incr_cli.config.presets import PRESETS
from incr_cli.methods.base import Strategy


class Distill(Strategy):
    """MLM on the new rows plus distillation from the parent (the teacher)."""

    name = "distill"
    preset = PRESETS[name]
