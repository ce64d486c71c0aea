"""replay: MLM on the new rows mixed with rows replayed from the lineage (``replay.ratio``), no teacher."""

from __future__ import annotations

from incr_cli.config.presets import PRESETS
from incr_cli.methods.base import Strategy


class Replay(Strategy):
    """MLM on new rows mixed with rows replayed from the lineage (``replay.ratio``)."""

    name = "replay"
    preset = PRESETS[name]
