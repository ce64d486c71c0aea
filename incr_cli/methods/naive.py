"""naive: plain MLM fine-tuning on the new data, no teacher and no replay: the lower bound."""

from __future__ import annotations

from incr_cli.config.presets import PRESETS
from incr_cli.methods.base import Strategy


class Naive(Strategy):
    """Plain MLM fine-tuning on the new data: the lower bound."""

    name = "naive"
    preset = PRESETS[name]
