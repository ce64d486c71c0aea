"""replay+distill (the default): replay and distillation with the recipe's own ``replay.*`` and
``distill.*``."""

from __future__ import annotations

from incr_cli.config.presets import PRESETS
from incr_cli.methods.base import Strategy


class ReplayDistill(Strategy):
    """Replay and distillation, with the recipe's own ``replay.*`` and ``distill.*``: by default the
    KL term reads only the replayed rows (``distill.rows=replay``), so the new rows are learned as a
    plain fine-tune learns them and the teacher runs on the replayed rows alone."""

    name = "replay+distill"
    preset = PRESETS[name]
    earlier_behaviour = {"distill.rows": "all", "distill.alpha": 0.5, "replay.weight": 1.0, "replay.on_top": False}
    earlier_behaviour_note = ("distilling on the new rows too, replayed rows weighing as much as the new "
                              "ones, and replayed rows taking a quarter of the batch's rows learned the new domain far "
                              "less than a plain fine-tune; the demo and experiment recipes had distill.alpha=1; "
                              "see docs/experiments.md")
