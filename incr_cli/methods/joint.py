"""joint: retrain from the lineage's root (v0000) on the union of every increment so far, with no
teacher and no replay: the retention upper bound at the cost of retraining. The new version's parent
is still the one it was planned from (the lineage continues); its manifest records ``init_from`` and,
in ``retrained``, the earlier increments it saw again."""

from __future__ import annotations

from incr_cli.config.presets import PRESETS
from incr_cli.config.recipe import Recipe
from incr_cli.methods.base import Strategy, root_version
from incr_cli.store.workspace import Workspace
from incr_cli.training.plan import TrainingData


class Joint(Strategy):
    """Retrain from the lineage's root on every increment so far: the retention upper bound."""

    name = "joint"
    preset = PRESETS[name]
    trains_from_root = True

    def training_data(self, ws: Workspace, recipe: Recipe, parent: str) -> TrainingData:
        """new = lineage + pending, no replay, from the root; nothing pending is nothing to train."""
        pending, lineage = ws.pending(parent), ws.trained_on(parent)
        if not pending:
            return TrainingData(pending, lineage)
        return TrainingData([*lineage, *pending], [], root_version(ws, parent), lineage)
