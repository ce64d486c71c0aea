"""Continual-learning strategies: one ``Strategy`` subclass per method, and the loss terms they add.

A strategy is looked up by ``strategy.name`` (``get_strategy``) and owns everything that makes it
differ from the others, so a new method (online EWC, LwF with replay, ...) is one subclass here,
one entry in ``STRATEGIES``, and its tests:

- ``preset``: the recipe keys it fixes (applied by ``recipe.build_recipe`` over the file and the
  overrides; ``incr recipe show`` says what it set);
- ``training_data``: the increments it trains on and where it starts from (joint: everything again
  from the lineage's root);
- ``loss_terms``: the terms of the one training loop (MLM on the new rows, MLM on the replayed
  rows, distillation from the teacher: each only when its weight is not zero), and
  ``extra_terms``: terms that need the parent's weights and data (EWC's penalty);
- ``version_files``: files written into the new version beside the weights (EWC's Fisher);
- ``extra_loss_names``: the names of its extra terms, reported in ``metrics.json`` (``loss``).

The two methods that need more than preset keys:

- **ewc** (Elastic Weight Consolidation, Kirkpatrick et al., 2017). At the end of an ewc increment
  the diagonal empirical Fisher of the MLM loss is estimated on the NEW weights over the data just
  trained (``ewc.fisher_batches`` batches) and stored beside the version as ``fisher.safetensors``
  (listed and checksummed in its manifest like every file). The next ewc increment adds the term
  ``ewc.weight / 2 * sum_i F_i (theta_i - theta*_i)^2``, theta* being the parent's weights.
  A parent without a Fisher file (v0000, or a version trained by another strategy) gets one
  estimated at the start, on the parent's weights over its lineage's data; with no earlier data
  (the first increment) there is nothing to protect and the term is left out, with a logged reason.
  One anchor, one Fisher: the penalty protects what the parent learned last, as specified; the
  Fisher of older increments is not accumulated (that would be "online EWC").
- **joint** retrains from the lineage's root (v0000) on the union of every increment so far, with
  no teacher and no replay: the retention upper bound at the cost of retraining. The new version's
  parent is still the one it was planned from (the lineage continues), its manifest records
  ``init_from`` and, in ``retrained``, the earlier increments it saw again.

Fisher estimator: F_i = mean over batches b of (d L_b / d theta_i)^2, with L_b the mean MLM
cross-entropy over batch b's masked tokens against the true tokens (the "empirical" Fisher, with
one gradient per batch as common implementations do), dropout off, masks and batches seeded.

Imports point down: ``recipe`` (presets), ``plan`` (training data), ``step`` and ``train`` use this
module; it uses only core modules, and knows the recipe and the plan by their attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from incr_cli import device as devices
from incr_cli.data import BatchSampler, IncrementShards
from incr_cli.errors import IntegrityError
from incr_cli.losses import ewc_penalty, hidden_loss_sum, kd_loss_sum, mlm_loss_sum
from incr_cli.masking import mask_batch, stable_seed
from incr_cli.reporting import Reporter
from incr_cli.workspace import Workspace

if TYPE_CHECKING:  # types only: recipe.py imports this module for the presets
    from incr_cli.recipe import Recipe

FISHER_FILE = "fisher.safetensors"


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


@dataclass
class EwcPenalty:
    """The EWC term: 1/2 * sum_i F_i (theta_i - theta*_i)^2 (the loop multiplies by ``weight`` = ewc.weight).

    ``anchor`` (theta*) and ``fisher`` hold the trainable parameters' tensors, on the training device.
    Computed alike on every rank and micro-batch, so each returns its share of the step's value.
    """

    weight: float
    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    name, needs_teacher, needs_hidden = "ewc", False, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        params = {n: p for n, p in out.model.named_parameters() if p.requires_grad and n in self.fisher}
        return ewc_penalty(params, self.anchor, self.fisher, 1.0) / (out.n_micro * out.world_size)


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


# ----------------------------------------------------------------------------- what a strategy sees


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
class StrategyInputs:
    """What ``extra_terms`` and ``version_files`` may use: the run's data, model and device."""

    ws: Workspace
    recipe: Recipe
    parent: str
    new: list[str]  # the increments trained as new data
    replay: list[str]  # the parent's lineage (the data it was trained on)
    model: nn.Module  # the student's Hugging Face model (holding the parent's weights in extra_terms)
    shards: dict[str, IncrementShards]  # every increment above, opened
    tok_inputs: dict[str, Any]  # ``evaluate.tokenizer_inputs``
    device: torch.device
    precision: str
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


_NO_DISTILL = {"distill.alpha": 0.0, "distill.hidden_weight": 0.0}


class Naive(Strategy):
    """Plain MLM fine-tuning on the new data: the lower bound."""

    name, preset = "naive", {**_NO_DISTILL, "replay.ratio": 0.0}


class Replay(Strategy):
    """MLM on new rows mixed with rows replayed from the lineage (``replay.ratio``)."""

    name, preset = "replay", dict(_NO_DISTILL)


class Distill(Strategy):
    """MLM on the new rows plus distillation from the parent (the teacher)."""

    name, preset = "distill", {"replay.ratio": 0.0, "distill.rows": "all"}


class ReplayDistill(Strategy):
    """Replay and distillation, with the recipe's own ``replay.*`` and ``distill.*``: by default the
    KL term reads only the replayed rows (``distill.rows=replay``), so the new rows are learned as a
    plain fine-tune learns them and the teacher runs on the replayed rows alone."""

    name = "replay+distill"
    earlier_behaviour = {"distill.rows": "all", "distill.alpha": 0.5, "replay.weight": 1.0, "replay.on_top": False}
    earlier_behaviour_note = ("issue 16: distilling on the new rows too, replayed rows weighing as much as the new "
                              "ones, and replayed rows taking a quarter of the batch's rows learned the new domain far "
                              "less than a plain fine-tune; the demo and experiment recipes had distill.alpha=1; "
                              "see README, Strategies")


class Ewc(Strategy):
    """MLM plus the EWC penalty anchored at the parent's weights (see the module docstring)."""

    name, preset, extra_loss_names = "ewc", {**_NO_DISTILL, "replay.ratio": 0.0}, ("ewc",)

    def extra_terms(self, inputs: StrategyInputs) -> list[LossTerm]:
        recipe, parent, reporter = inputs.recipe, inputs.parent, inputs.reporter
        if recipe.ewc.weight == 0:
            return []
        fisher = load_fisher(inputs.ws, parent, inputs.device)
        if fisher is None:
            earlier = [inputs.shards[d] for d in inputs.replay if len(inputs.shards[d].train)]
            if not earlier:
                reporter.log(f"ewc: no penalty in this increment: {parent} has no {FISHER_FILE} and no earlier "
                             "training data to estimate one on (nothing to protect yet)")
                return []
            reporter.log(f"ewc: {parent} has no {FISHER_FILE} (trained by another strategy or the base); "
                         f"estimating it on {', '.join(s.id for s in earlier)}")
            fisher = fisher_diagonal(inputs.model, earlier, recipe, inputs.tok_inputs, device=inputs.device,
                                     precision=inputs.precision)
        trainable = {n: p for n, p in inputs.model.named_parameters() if p.requires_grad}
        _check_fisher(fisher, trainable, parent)
        anchor = {n: p.detach().clone() for n, p in trainable.items() if n in fisher}
        kept = {n: fisher[n].to(inputs.device) for n in anchor}
        return [EwcPenalty(recipe.ewc.weight, anchor, kept)]

    def version_files(self, inputs: StrategyInputs) -> dict[str, bytes]:
        """``fisher.safetensors``: the new weights' Fisher on the data just trained."""
        recipe = inputs.recipe
        new = [inputs.shards[d] for d in inputs.new if len(inputs.shards[d].train)]
        inputs.reporter.log(f"ewc: estimating the Fisher of the new weights on {', '.join(s.id for s in new)} "
                            f"({recipe.ewc.fisher_batches} batches)")
        fisher = fisher_diagonal(inputs.model, new, recipe, inputs.tok_inputs, device=inputs.device,
                                 precision=inputs.precision)
        about = {"increments": [s.id for s in new], "batches": recipe.ewc.fisher_batches,
                 "batch_size": recipe.train.batch_size, "seed": recipe.train.seed,
                 "estimator": "empirical diagonal Fisher: mean over batches of squared MLM-loss gradients"}
        return {FISHER_FILE: fisher_bytes(fisher, about)}


class Joint(Strategy):
    """Retrain from the lineage's root on every increment so far: the retention upper bound."""

    name, preset = "joint", {**_NO_DISTILL, "replay.ratio": 0.0}
    trains_from_root = True

    def training_data(self, ws: Workspace, recipe: Recipe, parent: str) -> TrainingData:
        """new = lineage + pending, no replay, from the root; nothing pending is nothing to train."""
        pending, lineage = ws.pending(parent), ws.trained_on(parent)
        if not pending:
            return TrainingData(pending, lineage)
        return TrainingData([*lineage, *pending], [], root_version(ws, parent), lineage)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Naive(), Replay(), Distill(), ReplayDistill(), Ewc(), Joint())}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (the recipe has checked that it is one of ``STRATEGIES``)."""
    return STRATEGIES[name]


def reported_loss_names() -> tuple[str, ...]:
    """Every loss name ``metrics.json`` reports (None where a run had no such term), in a fixed order."""
    extra = [n for s in STRATEGIES.values() for n in s.extra_loss_names]
    return tuple(dict.fromkeys([*BASE_LOSS_NAMES, *extra]))


def root_version(ws: Workspace, version: str) -> str:
    """The first version of ``version``'s lineage (the one without a parent: normally v0000)."""
    root = ws.lineage(version)[0]
    if gone := ws.version_manifest(root).get("parent"):
        raise IntegrityError(f"{ws.version_dir(gone)}: missing, so {version}'s lineage has no root to retrain "
                             "from; restore it or train this line with another strategy")
    return root


# ----------------------------------------------------------------------------- the Fisher


def fisher_diagonal(model: nn.Module, shards: list[IncrementShards], recipe: Recipe, tok_inputs: dict[str, Any], *,
                    device: torch.device, precision: str, batches: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the MLM loss of ``model`` on the train rows of ``shards``.

    -> {parameter name: (same shape as the parameter) float32 on ``device``}, for every parameter,
    frozen or not (the next increment may freeze differently). ``batches`` (default
    ``ewc.fisher_batches``) batches of ``train.batch_size`` rows, drawn like training's new rows
    (``train.seed``, ``data.sample``), masked by generators seeded from (train.seed, batch).
    The model's mode and requires_grad flags are restored; its ``.grad`` are left None.
    """
    from incr_cli.heads import MaskedLMHead  # transformers: only when a Fisher is estimated

    batches = batches or recipe.ewc.fisher_batches
    sampler = BatchSampler(shards, [], n_new=recipe.train.batch_size, n_replay=0, seed=recipe.train.seed,
                           sample=recipe.data.sample)
    params = dict(model.named_parameters())
    flags, was_training = {n: p.requires_grad for n, p in params.items()}, model.training
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    head = MaskedLMHead(model)
    model.eval()  # no dropout: the Fisher of the model that will be used, not of a noisy copy
    generator = torch.Generator(device=device)
    pad_id = shards[0].pad_id
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for b in range(batches):
            ids = torch.from_numpy(sampler.next_batch().input_ids).to(device)  # (B, T)
            generator.manual_seed(stable_seed("ewc-fisher", recipe.train.seed, b))
            masked = mask_batch(ids, recipe.masking, special_ids=tok_inputs["special_ids"].to(device),
                                mask_token_id=tok_inputs["mask_token_id"], vocab_size=tok_inputs["vocab_size"],
                                generator=generator, word_starts=_on(tok_inputs.get("word_starts"), device))
            with torch.enable_grad(), devices.autocast(device, precision):
                logits, _ = head(masked.input_ids, ids != pad_id, masked.positions)  # (N, V)
            loss = mlm_loss_sum(logits, masked.targets) / max(int(masked.targets.numel()), 1)
            loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.float().pow(2)
                        p.grad = None
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
    return {name: f / batches for name, f in fisher.items()}


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _grown_rows(fisher: dict[str, torch.Tensor], trainable: dict[str, nn.Parameter]) -> None:
    """In place: a Fisher of a parent whose vocabulary the student grew from (vocab.py) gets zero rows
    for the new tokens' rows (embeddings, output projection and bias): EWC holds only what the
    parent had."""
    for name, p in trainable.items():
        f = fisher.get(name)
        if f is not None and f.dim() == p.dim() and f.shape[0] < p.shape[0] and f.shape[1:] == p.shape[1:]:
            fisher[name] = torch.cat([f, f.new_zeros((p.shape[0] - f.shape[0], *f.shape[1:]))])


def _check_fisher(fisher: dict[str, torch.Tensor], trainable: dict[str, nn.Parameter], parent: str) -> None:
    """IntegrityError when a stored Fisher does not fit the model it is to anchor."""
    _grown_rows(fisher, trainable)
    for name, p in trainable.items():
        if name in fisher and fisher[name].shape != p.shape:
            raise IntegrityError(f"{parent}/{FISHER_FILE}: {name} has shape {tuple(fisher[name].shape)}, the "
                                 f"model's is {tuple(p.shape)}; remove the file to have it estimated again")
    if not any(name in fisher for name in trainable):
        raise IntegrityError(f"{parent}/{FISHER_FILE}: names none of the model's parameters (e.g. "
                             f"{next(iter(fisher), 'none')!r}); remove the file to have it estimated again")


def fisher_bytes(fisher: dict[str, torch.Tensor], about: dict[str, Any]) -> bytes:
    """The safetensors file of a Fisher estimate; ``about`` goes into its metadata (as JSON)."""
    from safetensors.torch import save

    tensors = {name: f.detach().to("cpu", torch.float32).contiguous() for name, f in fisher.items()}
    return save(tensors, metadata={"format": "1", "kind": "ewc-fisher", "about": json.dumps(about, sort_keys=True)})


def load_fisher(ws: Workspace, version: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
    """``version``'s stored Fisher (None when it has none). The file must be listed in the manifest;
    its checksum is verified with the folder's (``models.load_version`` / ``incr verify``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ws.version_dir(version) / FISHER_FILE
    if not path.is_file():
        return None
    if FISHER_FILE not in (ws.version_manifest(version).get("files") or {}):
        raise IntegrityError(f"{path}: not listed in {version}'s manifest, so it was not written by incr; remove it")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{path}: cannot be read ({exc}); run `incr verify {ws.root} --all`") from None


__all__ = ["FISHER_FILE", "STRATEGIES", "EwcPenalty", "HiddenDistill", "LogitDistill", "LossTerm", "MicroOutputs",
           "MlmNew", "MlmReplay", "Normalisers", "Strategy", "StrategyInputs", "TrainingData", "fisher_bytes",
           "fisher_diagonal", "get_strategy", "load_fisher", "reported_loss_names", "root_version", "rows_count",
           "rows_slice", "teacher_rows"]
