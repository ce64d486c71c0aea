"""The continual-learning methods: one file per method, each a ``Strategy`` subclass, looked up by
``strategy.name``.

A method owns everything that sets it apart from the one training loop (``training/step.py``):
the increments it trains on (``training_data``), its loss terms (``loss_terms``, ``extra_terms``),
the files it writes beside a version (``version_files``). Its recipe preset (the keys it fixes) is
named from ``config/presets.py``, where the recipe applies it below every method.
A new method is one file here, one entry in ``STRATEGIES`` and its preset.

Why torch is imported at module level in this wing: every method builds tensors. Why transformers
is not (``compress.py`` imports the training step and scores, ``ewc.py`` the masked-LM head, inside
their functions): ``incr gc`` reads the methods (``STRATEGIES``) without loading a model library."""

from __future__ import annotations

from incr_cli.config.recipe import Recipe
from incr_cli.methods.base import Strategy
from incr_cli.methods.distill import Distill
from incr_cli.methods.ewc import Ewc
from incr_cli.methods.joint import Joint
from incr_cli.methods.naive import Naive
from incr_cli.methods.replay import Replay
from incr_cli.methods.replay_distill import ReplayDistill
from incr_cli.store.workspace import Workspace
from incr_cli.training.plan import IncrementPlan, budget
from incr_cli.training.terms import BASE_LOSS_NAMES, LossTerm

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Naive(), Replay(), Distill(), ReplayDistill(), Ewc(), Joint())}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (the recipe has checked that it is one of ``STRATEGIES``)."""
    return STRATEGIES[name]


def reported_loss_names() -> tuple[str, ...]:
    """Every loss name ``metrics.json`` reports (None where a run had no such term), in a fixed order."""
    extra = [n for s in STRATEGIES.values() for n in s.extra_loss_names]
    return tuple(dict.fromkeys([*BASE_LOSS_NAMES, *extra]))


def loss_terms(recipe: Recipe, plan: IncrementPlan, shared_vocab: int | None = None) -> list[LossTerm]:
    """The loop's loss terms for ``plan`` under the recipe's strategy (``Strategy.loss_terms``)."""
    return get_strategy(recipe.strategy.name).loss_terms(recipe, plan.replay_per_batch > 0, shared_vocab=shared_vocab)


def plan_increment(ws: Workspace, recipe: Recipe, parent: str | None = None, *, world_size: int = 1) -> IncrementPlan:
    """Parent (LATEST unless given), what the recipe's strategy trains from it, and the budget
    (``plan.budget``)."""
    parent = ws.resolve_version(parent)
    data = get_strategy(recipe.strategy.name).training_data(ws, recipe, parent)
    return budget(ws, recipe, parent, data, world_size=world_size)
