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
    earlier_behaviour = {"replay.ratio": 0.25, "replay.weight": 0.33, "distill.alpha": 0.33, "train.schedule": "cosine"}
    earlier_behaviour_note = ("a quarter of replay with a cosine decay ended make stream's eight-domain line at 1.16x a "
                              "joint retrain's perplexity, half of it with the wsd schedule below joint on every domain; "
                              "before that change, distill.rows=all, distill.alpha=0.5, replay.weight=1.0 and "
                              "replay.on_top=false learned the new domain far less than a plain fine-tune; see "
                              "docs/experiments.md")
