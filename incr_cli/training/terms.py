"""The loss terms of the one training loop, and what a term sees of a micro-batch.

A term reads the student's (and the teacher's) outputs for the rows it names and returns a summed
loss; the step divides by the normalisers. The methods (``methods/``) choose which terms a run has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from incr_cli.training.losses import hidden_loss_sum, kd_loss_sum, mlm_loss_sum

# ----------------------------------------------------------------------------- loss terms


@dataclass
class Normalisers:
    """Token counts over the whole accumulation window and all ranks (floats, at least 1)."""

    new_targets: float
    replay_targets: float
    masked_targets: float
    tokens: float


@dataclass
class MicroOutputs:
    """One micro-batch after the forward passes. Targets of new rows come first (``n_new_targets``)."""

    student_logits: torch.Tensor  # (N, V)
    targets: torch.Tensor  # (N,)
    n_new_targets: int
    attention_mask: torch.Tensor  # (B, T)
    norm: Normalisers
    model: nn.Module  # the student's Hugging Face model, unwrapped (for parameter-space terms such as EWC)
    micro: int
    n_micro: int
    world_size: int
    teacher_logits: torch.Tensor | None = None  # (N, V), or the targets of ``teacher_rows`` only
    teacher_rows: str = "all"  # the rows the teacher ran on: "all", "new" or "replay" (``teacher_rows(terms)``)
    student_hidden: torch.Tensor | None = None  # (B, T, H)
    teacher_hidden: torch.Tensor | None = None  # (B, T, H)


class LossTerm(Protocol):
    """One term of the loss: the loop adds ``weight * term(out)`` for every micro-batch on every rank.

    ``term(out)`` is this rank's and micro-batch's share: summed over the micro-batches of a step
    and over the ranks it must give the step's value of the term. Token terms divide their sum by
    the window's global count (``out.norm``); a parameter-space term (EWC) that every rank computes
    alike returns ``penalty / (out.n_micro * out.world_size)``.
    """

    name: str
    weight: float
    needs_teacher: bool  # the teacher's logits at the masked positions
    needs_hidden: bool  # last hidden states of student and teacher

    def __call__(self, out: MicroOutputs) -> torch.Tensor: ...


@dataclass
class MlmNew:
    weight: float = 1.0
    name, needs_teacher, needs_hidden = "mlm_new", False, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        k = out.n_new_targets
        return mlm_loss_sum(out.student_logits[:k], out.targets[:k]) / out.norm.new_targets


@dataclass
class MlmReplay:
    weight: float
    name, needs_teacher, needs_hidden = "mlm_replay", False, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        k = out.n_new_targets
        return mlm_loss_sum(out.student_logits[k:], out.targets[k:]) / out.norm.replay_targets


@dataclass
class LogitDistill:
    """KL between teacher and student at the masked positions of the rows ``rows`` names
    (``distill.rows``): "all", the "new" rows or the "replay" rows, divided by that set's target
    count over the window. After vocabulary growth (``shared_vocab``: the teacher's vocabulary size)
    both distributions are softmaxes over the ids they share, the teacher's vocabulary: the
    student's is renormalised over those ids, and the new tokens' logits get no gradient from this
    term (learning them is the MLM terms' job)."""

    weight: float
    temperature: float
    shared_vocab: int | None = None
    rows: str = "all"
    name, needs_teacher, needs_hidden = "distill", True, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        picked = rows_slice(self.rows, out.n_new_targets)
        student = out.student_logits[picked]  # (n, V)
        teacher = out.teacher_logits if out.teacher_rows == self.rows else out.teacher_logits[picked]
        if self.shared_vocab is not None:
            student, teacher = student[:, :self.shared_vocab], teacher[:, :self.shared_vocab]
        count = {"all": out.norm.masked_targets, "new": out.norm.new_targets, "replay": out.norm.replay_targets}
        return kd_loss_sum(student, teacher, self.temperature) / count[self.rows]


@dataclass
class HiddenDistill:
    weight: float
    kind: str
    name, needs_teacher, needs_hidden = "hidden", True, True

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        return hidden_loss_sum(out.student_hidden, out.teacher_hidden, out.attention_mask, self.kind) / out.norm.tokens


BASE_LOSS_NAMES = ("mlm_new", "mlm_replay", "distill", "hidden")  # what ``Strategy.loss_terms`` may build


def rows_slice(rows: str, n_new: int) -> slice:
    """The part of a batch (or of its masked targets, ``n_new`` of them from new rows) that ``rows``
    ("all", "new" or "replay") names: new rows come first, then the replayed ones."""
    return {"all": slice(None), "new": slice(None, n_new), "replay": slice(n_new, None)}[rows]


def rows_count(rows: str, n_new: int, n_replay: int) -> int:
    """How many of ``n_new`` new and ``n_replay`` replayed rows ``rows`` names."""
    return {"all": n_new + n_replay, "new": n_new, "replay": n_replay}[rows]


def teacher_rows(terms: list[LossTerm]) -> str:
    """The rows the teacher must run on for ``terms``: "new" or "replay" when every term that needs
    it reads only those rows' logits (``distill.rows``), else "all". A teacher forward over a quarter
    of the batch (the replayed rows) costs a quarter of one over all of it."""
    wanted = {getattr(term, "rows", "all") if not term.needs_hidden else "all" for term in terms if term.needs_teacher}
    return wanted.pop() if len(wanted) == 1 else "all"
