"""What one increment trains: the parent, the pending, new-row and replayed increments, the step
budget, and the run's identity (the key a resumable state and a finished version are recorded
under). The words are the glossary's (docs/development.md).

Pure reads of the workspace: ``train-increment --dry-run`` prints a plan without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from incr_cli import __version__
from incr_cli.config.recipe import Recipe, recipe_to_dict
from incr_cli.data.shards import replay_shares, split_batch_size
from incr_cli.errors import InputError, UsageError
from incr_cli.store.workspace import Workspace
from incr_cli.training.checkpointing import resume_key

# Recipe keys that do not change the trained weights: left out of the resume key.
_NOT_IN_KEY = {"eval", "gate", "tracking", "retention", "vocab"}  # measured, reported, kept or ingest-only
_RUNTIME_IN_KEY = ("device", "precision")


@dataclass
class TrainingData:
    """The increments an increment trains on, and where its weights start."""

    new: list[str]  # trained as new data
    replay: list[str]  # replay rows may come from these (drawn from only when replay.ratio > 0)
    init_from: str | None = None  # the version whose weights training starts from (None: the parent)
    retrained: list[str] | None = None  # earlier increments trained again as new data

    def __post_init__(self) -> None:
        self.retrained = list(self.retrained or [])


@dataclass
class IncrementPlan:
    """What one ``train-increment`` will do (the dry run prints it)."""

    parent: str
    new: list[str]  # increments of the new rows: the pending ones (joint: the earlier ones too)
    replay: list[str]  # increments replay rows may come from: the earlier ones (none for joint)
    new_sequences: int  # training sequences of the new increments (after data.sample)
    replay_sequences: int
    new_per_batch: int  # rows per micro-batch and rank
    replay_per_batch: int
    world_size: int
    steps: int
    tokens: int  # upper bound: rows per step x seq_len x steps
    seq_len: int
    earlier: list[str] = field(default_factory=list)  # what the parent was trained on: scored before and after
    init_from: str | None = None  # joint: the version whose weights training starts from
    retrained: list[str] = field(default_factory=list)  # joint: earlier increments trained again
    # replayed rows each replay increment can expect over the run (replay.split): < 1 = not covered
    replay_rows: dict[str, float] = field(default_factory=dict)

    @property
    def uncovered(self) -> list[str]:
        """Replay increments that would get no replayed row in expectation (fewer than one)."""
        return [d for d, rows in self.replay_rows.items() if rows < 1.0] if self.replay_per_batch else []

    @property
    def pending(self) -> list[str]:
        """The increments this version adds to the lineage (``trained_on = earlier + pending``).

        metrics.json and the manifest call them ``new`` (kept for the files already written)."""
        return [d for d in self.new if d not in self.earlier]

    @property
    def trained_on(self) -> list[str]:
        """The new version's lineage, each increment scored before and after: earlier, then pending."""
        return [*self.earlier, *self.pending]

    @property
    def nothing_to_train(self) -> bool:
        return not self.new

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def budget(ws: Workspace, recipe: Recipe, parent: str, data: TrainingData, *, world_size: int = 1) -> IncrementPlan:
    """The plan of training ``data`` (what the strategy trains on, from ``parent``) and its budget.

    Steps: ``train.steps``, else ceil(epochs * new sequences / new rows per step), capped so that
    no more than ``train.max_tokens`` tokens are processed.
    """
    new, replay, init_from, retrained = data.new, data.replay, data.init_from, data.retrained
    earlier = ws.trained_on(parent)
    manifests = {d: ws.increment_manifest(d) for d in [*new, *replay]}
    count = {d: int(m.get("sequences", {}).get("train", 0)) for d, m in manifests.items()}
    seq_len = int(manifests[new[0]]["seq_len"]) if new else 0
    new_sequences = sum(count[d] for d in new)
    if recipe.data.sample is not None:
        new_sequences = min(new_sequences, recipe.data.sample)
    replay_sequences = sum(count[d] for d in replay)
    t = recipe.train
    n_new, n_replay = split_batch_size(t.batch_size, recipe.replay.ratio, replay_sequences > 0, recipe.replay.on_top)
    plan = IncrementPlan(parent, new, replay, new_sequences, replay_sequences, n_new, n_replay, world_size,
                         0, 0, seq_len, earlier, init_from, retrained)
    if not new:
        return plan
    if new_sequences == 0:
        raise InputError(f"the pending increments ({', '.join(new)}) hold no training sequences (everything went "
                         "to the held-out split); ingest more text or lower data.heldout_fraction")
    rows_per_step = (n_new + n_replay) * t.grad_accum * world_size
    steps = t.steps or math.ceil(t.epochs * new_sequences / (n_new * t.grad_accum * world_size))
    if t.max_tokens is not None:
        affordable = t.max_tokens // (rows_per_step * seq_len)
        if affordable < 1:
            raise UsageError(f"train.max_tokens={t.max_tokens} is less than one optimizer step "
                             f"({rows_per_step * seq_len} tokens); raise it or lower train.batch_size")
        steps = min(steps, affordable)
    plan.steps = steps
    plan.tokens = steps * rows_per_step * seq_len
    if n_replay:
        shares = replay_shares([count[d] for d in replay], recipe.replay.split)
        drawn = n_replay * t.grad_accum * world_size * steps
        plan.replay_rows = {d: round(float(share) * drawn, 2) for d, share in zip(replay, shares)}
    return plan


def run_key(plan: IncrementPlan, recipe: Recipe, parent_weights_sha: str) -> str:
    """Identity of a training run: the same key means the same weights at the end (and a state
    layout this incr can read: its version is part of the key)."""
    r = recipe_to_dict(recipe)
    training = {k: v for k, v in r.items() if k not in _NOT_IN_KEY and k != "runtime"}
    training["runtime"] = {k: r["runtime"][k] for k in _RUNTIME_IN_KEY}
    training["train"] = {k: v for k, v in training["train"].items() if k != "log_every"}
    training["data"] = {k: v for k, v in training["data"].items() if k != "batch_docs"}  # ingest-only, added later
    return resume_key({"incr": __version__, "parent": plan.parent, "parent_weights": parent_weights_sha,
                       "new": plan.new, "replay": plan.replay, "init_from": plan.init_from, "steps": plan.steps,
                       "world_size": plan.world_size, "recipe": training})
