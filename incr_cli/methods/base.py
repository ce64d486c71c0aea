"""What a continual-learning method is: the ``Strategy`` base every method file subclasses, and
what a method sees of a run (``StrategyInputs``).

A method owns everything that makes it differ from the others:

- ``preset``: the recipe keys it fixes (``config/presets.py``, applied by ``recipe.build_recipe``
  over the file and the overrides; ``incr recipe show`` says what it set);
- ``training_data``: the increments it trains on and where it starts from (joint: everything again
  from the lineage's root);
- ``loss_terms``: the terms of the one training loop (MLM on the new rows, MLM on the replayed
  rows, distillation from the teacher: each only when its weight is not zero), and
  ``extra_terms``: terms that need the parent's weights and data (EWC's penalty);
- ``version_files``: files written into the new version beside the weights (EWC's Fisher);
- ``extra_loss_names``: the names of its extra terms, reported in ``metrics.json`` (``loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from incr_cli.config.recipe import Recipe
from incr_cli.data.shards import IncrementShards
from incr_cli.errors import IntegrityError
from incr_cli.progress import Reporter
from incr_cli.runtime.device import Placement
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import TokenIds
from incr_cli.training.plan import TrainingData
from incr_cli.training.terms import HiddenDistill, LogitDistill, LossTerm, MlmNew, MlmReplay

# ----------------------------------------------------------------------------- what a strategy sees


@dataclass
class StrategyInputs:
    """What ``extra_terms`` and ``version_files`` may use: the run's data, model and device."""

    ws: Workspace
    recipe: Recipe
    parent: str
    new: list[str]  # the increments trained as new data
    replay: list[str]  # the parent's lineage (the data it was trained on)
    model: nn.Module  # the student's Hugging Face model (holding the parent's weights in extra_terms)
    shards: dict[str, IncrementShards]  # every increment above, opened
    tok_inputs: TokenIds  # ``masking.tokenizer_inputs``
    place: Placement  # the run's device and precision
    reporter: Reporter


# ----------------------------------------------------------------------------- the strategies


class Strategy:
    """A continual-learning method: what sets it apart from the one training loop every method runs."""

    name: ClassVar[str]
    preset: ClassVar[dict[str, Any]] = {}  # recipe keys it fixes ("section.key": value)
    extra_loss_names: ClassVar[tuple[str, ...]] = ()  # names of the terms ``extra_terms`` may add
    trains_from_root: ClassVar[bool] = False  # starts from the lineage's root: retention keeps that version
    earlier_behaviour: ClassVar[dict[str, Any]] = {}  # keys that give back how it trained before its defaults changed
    earlier_behaviour_note: ClassVar[str] = ""  # when and why they changed (the recipe reference prints both)

    def training_data(self, ws: Workspace, recipe: Recipe, parent: str) -> TrainingData:
        """From ``parent``: new = its pending increments, replay = its lineage's, start from its weights."""
        return TrainingData(ws.pending(parent), ws.trained_on(parent))

    def loss_terms(self, recipe: Recipe, has_replay: bool, shared_vocab: int | None = None) -> list[LossTerm]:
        """The terms of the loop; a zero weight builds no term (and no teacher when none needs one).
        ``shared_vocab``: the student grew from the teacher's vocabulary of that size (``LogitDistill``)."""
        terms: list[LossTerm] = [MlmNew()]
        if has_replay:
            terms.append(MlmReplay(recipe.replay.weight))
        if recipe.distill.alpha > 0 and (has_replay or recipe.distill.rows != "replay"):
            terms.append(LogitDistill(recipe.distill.alpha, recipe.distill.temperature, shared_vocab,
                                      recipe.distill.rows))
        if recipe.distill.hidden_weight > 0:
            terms.append(HiddenDistill(recipe.distill.hidden_weight, recipe.distill.hidden_loss))
        return terms

    def extra_terms(self, inputs: StrategyInputs) -> list[LossTerm]:
        """Terms computed from the parent: called while ``inputs.model`` still holds the parent's weights."""
        return []

    def version_files(self, inputs: StrategyInputs) -> dict[str, bytes]:
        """Files written into the new version beside its weights: called on the trained weights."""
        return {}


def root_version(ws: Workspace, version: str) -> str:
    """The first version of ``version``'s lineage (the one without a parent: normally v0000)."""
    root = ws.lineage(version)[0]
    if gone := ws.version_manifest(root).get("parent"):
        raise IntegrityError(f"{ws.version_dir(gone)}: missing, so {version}'s lineage has no root to retrain "
                             "from; restore it or train this line with another strategy")
    return root
