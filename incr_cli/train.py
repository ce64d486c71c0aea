"""One increment of training: plan, loop, before/after eval, gate, and the new version.

``train_increment`` reads top to bottom: plan what to train -> load the parent (teacher and student)
-> resume or evaluate the parent -> ``train_step`` until the budget is spent -> evaluate -> gate ->
write ``checkpoints/vNNNN`` -> move ``LATEST`` when promoted. Every strategy runs this one loop; they
differ only in the data the sampler draws (new / replay rows) and in the loss terms built by
``build_loss_terms`` (each term is a small object, so EWC or others plug in as one more term).

Loss of one optimizer step (sums over the accumulation window, each divided by its own token count
over the whole window and all ranks, so micro-batch boundaries do not change the result):

    L = mlm(new)/n_new + replay.weight * mlm(replay)/n_replay + alpha * kd(all masked)/n_masked
        + hidden_weight * hidden(all tokens)/n_tokens

With alpha = hidden_weight = 0 and replay.ratio = 0 this is exactly plain MLM fine-tuning.

Host synchronisation: one small read per step of the window's masked-token counts (the masked-only
head's gather is data-dependent anyway); loss values are read only every ``train.log_every`` steps
on CUDA. On CPU every step's loss is checked (it costs nothing there), so a non-finite loss stops
the run before the optimizer applies it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from incr_cli import __version__, distributed, strategies
from incr_cli import device as devices
from incr_cli.checkpointing import ResumeStore, StopSignal, capture_rng, restore_rng, resume_key
from incr_cli.data import BatchSampler, IncrementShards, open_increment, split_batch_size
from incr_cli.errors import GateRejected, InputError, Interrupted, TrainingFailed, UsageError
from incr_cli.faults import fault_point, fault_value
from incr_cli.heads import MaskedLMHead
from incr_cli.losses import hidden_loss_sum, kd_loss_sum, mlm_loss_sum
from incr_cli.masking import mask_batch
from incr_cli.recipe import Recipe, TrainConfig, recipe_to_dict
from incr_cli.reporting import Quiet, Reporter
from incr_cli.schedule import lr_factor, warmup_steps
from incr_cli.workspace import Workspace

TAIL_FRACTION = 0.1  # metrics' losses average the last 10% of steps
# Recipe keys that do not change the trained weights: left out of the resume key.
_NOT_IN_KEY = {"eval", "gate"}
_RUNTIME_IN_KEY = ("device", "precision")


# ----------------------------------------------------------------------------- the plan


@dataclass
class IncrementPlan:
    """What one ``train-increment`` will do (the dry run prints it)."""

    parent: str
    new: list[str]  # increments trained as new data (joint: the whole lineage plus the pending ones)
    replay: list[str]  # increments replay rows may come from (the lineage; none for joint)
    new_sequences: int  # training sequences of the new increments (after data.sample)
    replay_sequences: int
    new_per_batch: int  # rows per micro-batch and rank
    replay_per_batch: int
    world_size: int
    steps: int
    tokens: int  # upper bound: rows per step x seq_len x steps
    seq_len: int
    earlier: list[str] = field(default_factory=list)  # the parent's lineage: where forgetting is measured
    init_from: str | None = None  # joint: the version whose weights training starts from
    retrained: list[str] = field(default_factory=list)  # joint: earlier increments trained again

    @property
    def pending(self) -> list[str]:
        """The increments this version adds to the lineage (``trained_on = earlier + pending``)."""
        return [d for d in self.new if d not in self.earlier]

    @property
    def nothing_to_train(self) -> bool:
        return not self.new

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_increment(ws: Workspace, recipe: Recipe, parent: str | None = None, *, world_size: int = 1) -> IncrementPlan:
    """Parent (LATEST unless given), the pending new increments, the lineage to replay, and the budget.

    Steps: ``train.steps``, else ceil(epochs * new sequences / new rows per step), capped so that
    no more than ``train.max_tokens`` tokens are processed.
    """
    from incr_cli.strategies import training_data

    parent = ws.resolve_version(parent)
    new, replay, init_from, retrained = training_data(ws, recipe, parent)
    earlier = ws.trained_on(parent)
    manifests = {d: ws.increment_manifest(d) for d in [*new, *replay]}
    count = {d: int(m.get("sequences", {}).get("train", 0)) for d, m in manifests.items()}
    seq_len = int(manifests[new[0]]["seq_len"]) if new else 0
    new_sequences = sum(count[d] for d in new)
    if recipe.data.sample is not None:
        new_sequences = min(new_sequences, recipe.data.sample)
    replay_sequences = sum(count[d] for d in replay)
    t = recipe.train
    n_new, n_replay = split_batch_size(t.batch_size, recipe.replay.ratio, replay_sequences > 0)
    plan = IncrementPlan(parent, new, replay, new_sequences, replay_sequences, n_new, n_replay, world_size,
                         0, 0, seq_len, earlier, init_from, retrained)
    if not new:
        return plan
    if new_sequences == 0:
        raise InputError(f"the pending increments ({', '.join(new)}) hold no training sequences (everything went "
                         "to the held-out split); ingest more text or lower data.heldout_fraction")
    rows_per_step = t.batch_size * t.grad_accum * world_size
    steps = t.steps or math.ceil(t.epochs * new_sequences / (n_new * t.grad_accum * world_size))
    if t.max_tokens is not None:
        affordable = t.max_tokens // (rows_per_step * seq_len)
        if affordable < 1:
            raise UsageError(f"train.max_tokens={t.max_tokens} is less than one optimizer step "
                             f"({rows_per_step * seq_len} tokens); raise it or lower train.batch_size")
        steps = min(steps, affordable)
    plan.steps = steps
    plan.tokens = steps * rows_per_step * seq_len
    return plan


def run_key(plan: IncrementPlan, recipe: Recipe, parent_weights_sha: str) -> str:
    """Identity of a training run: the same key means the same weights at the end (and a state
    layout this incr can read: its version is part of the key)."""
    r = recipe_to_dict(recipe)
    training = {k: v for k, v in r.items() if k not in _NOT_IN_KEY and k != "runtime"}
    training["runtime"] = {k: r["runtime"][k] for k in _RUNTIME_IN_KEY}
    training["train"] = {k: v for k, v in training["train"].items() if k != "log_every"}
    return resume_key({"incr": __version__, "parent": plan.parent, "parent_weights": parent_weights_sha,
                       "new": plan.new, "replay": plan.replay, "init_from": plan.init_from, "steps": plan.steps,
                       "world_size": plan.world_size, "recipe": training})


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
    model: nn.Module  # the unwrapped student (for parameter-space terms such as EWC)
    micro: int
    n_micro: int
    world_size: int
    teacher_logits: torch.Tensor | None = None  # (N, V)
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
class Distill:
    weight: float
    temperature: float
    name, needs_teacher, needs_hidden = "distill", True, False

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        return kd_loss_sum(out.student_logits, out.teacher_logits, self.temperature) / out.norm.masked_targets


@dataclass
class HiddenDistill:
    weight: float
    kind: str
    name, needs_teacher, needs_hidden = "hidden", True, True

    def __call__(self, out: MicroOutputs) -> torch.Tensor:
        return hidden_loss_sum(out.student_hidden, out.teacher_hidden, out.attention_mask, self.kind) / out.norm.tokens


def build_loss_terms(recipe: Recipe, has_replay: bool) -> list[LossTerm]:
    """The strategy's terms; a zero weight builds no term (and no teacher when none needs one)."""
    terms: list[LossTerm] = [MlmNew()]
    if has_replay:
        terms.append(MlmReplay(recipe.replay.weight))
    if recipe.distill.alpha > 0:
        terms.append(Distill(recipe.distill.alpha, recipe.distill.temperature))
    if recipe.distill.hidden_weight > 0:
        terms.append(HiddenDistill(recipe.distill.hidden_weight, recipe.distill.hidden_loss))
    return terms


# ----------------------------------------------------------------------------- the run and its state


@dataclass
class Run:
    """Everything fixed during a run. ``student`` is what the loop calls (maybe DDP / compiled);
    ``head`` the plain MaskedLMHead and ``model`` the Hugging Face model inside it."""

    head: MaskedLMHead
    student: nn.Module
    teacher: MaskedLMHead | None
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    terms: list[LossTerm]
    train: TrainConfig
    masking: Any  # MaskingConfig
    special_ids: torch.Tensor
    mask_token_id: int
    vocab_size: int
    pad_id: int
    word_starts: torch.Tensor | None
    device: torch.device
    precision: str
    steps: int
    ctx: distributed.DistContext
    ddp: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        return self.head.model

    @property
    def term_names(self) -> list[str]:
        return [t.name for t in self.terms]


@dataclass
class TrainState:
    """Everything that changes during a run (saved for resume with the weights and optimizer)."""

    step: int = 0
    tokens: int = 0  # non-pad tokens processed, all ranks
    train_seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, Any] | None = None
    window: dict[str, Any] = field(default_factory=dict)  # device sums since the last log line
    tail: dict[str, Any] = field(default_factory=dict)  # device sums over the last TAIL_FRACTION of steps
    first_bad_step: torch.Tensor | None = None  # device int, -1 while every loss was finite
    local_tokens_since_log: int = 0
    lr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (what torch.load(weights_only=True) reads back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


def _mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    digest = hashlib.sha256(f"train-mask\0{seed}\0{rank}\0{step}\0{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _zeros(run: Run, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros((), dtype=torch.float32, device=run.device) for n in names}


def train_step(run: Run, state: TrainState, *, check_loss: bool) -> float | None:
    """One optimizer step over ``train.grad_accum`` micro-batches; updates ``state``.

    Returns the step's total loss (all ranks) when ``check_loss`` (read from the device), else None.
    Raises TrainingFailed on a non-finite loss before the optimizer applies it.
    """
    t, dev = run.train, run.device
    generator = torch.Generator(device=dev)
    micros = []
    for m in range(t.grad_accum):  # mask the whole window first: the counts normalise every term
        batch = run.sampler.next_batch()
        ids_np = batch.input_ids  # (B, T) new rows first
        state.local_tokens_since_log += int((ids_np != run.pad_id).sum())
        ids = torch.from_numpy(ids_np)
        ids = ids.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else ids
        generator.manual_seed(_mask_seed(t.seed, run.ctx.rank, state.step, m))
        masked = mask_batch(ids, run.masking, special_ids=run.special_ids, mask_token_id=run.mask_token_id,
                            vocab_size=run.vocab_size, generator=generator, word_starts=run.word_starts)
        micros.append((masked, ids != run.pad_id, len(batch.new_ids)))
    counts = torch.stack([torch.stack([p.positions[:n].sum(), p.positions[n:].sum(), a.sum()])
                          for p, a, n in micros]).float()  # (M, 3)
    window = run.ctx.all_reduce_sum(counts.sum(0))
    host = torch.cat([counts[:, 0], window]).tolist()  # the step's one host read
    per_micro_new, (n_new, n_replay, n_tokens) = host[:-3], host[-3:]
    norm = Normalisers(max(n_new, 1.0), max(n_replay, 1.0), max(n_new + n_replay, 1.0), max(n_tokens, 1.0))

    need_teacher = any(term.needs_teacher for term in run.terms)
    need_hidden = any(term.needs_hidden for term in run.terms)
    step_terms = _zeros(run, run.term_names)
    step_total = torch.zeros((), dtype=torch.float32, device=dev)
    for m, (masked, attention, _) in enumerate(micros):
        sync = run.ddp.no_sync() if run.ddp is not None and m < len(micros) - 1 else nullcontext()
        with sync:
            with devices.autocast(dev, run.precision):
                logits, hidden = run.student(masked.input_ids, attention, masked.positions, output_hidden=need_hidden)
            out = MicroOutputs(logits, masked.targets, int(per_micro_new[m]), attention, norm, run.model, m,
                               len(micros), run.ctx.world_size, student_hidden=hidden)
            if need_teacher:
                with torch.inference_mode(), devices.autocast(dev, run.precision):
                    t_logits, t_hidden = run.teacher(masked.input_ids, attention, masked.positions,
                                                     output_hidden=need_hidden)
                out.teacher_logits, out.teacher_hidden = t_logits, t_hidden  # the losses detach them
            loss = torch.zeros((), dtype=torch.float32, device=dev)
            for term in run.terms:
                value = term(out)
                step_terms[term.name] += value.detach()
                loss = loss + term.weight * value
            step_total += loss.detach()
            # DDP averages gradients over ranks; the terms are already global means, so undo it.
            (loss * run.ctx.world_size).backward()

    if check_loss:
        total = fault_value("train.loss", run.ctx.all_reduce_sum(step_total.clone()).item())
        if not math.isfinite(total):
            raise TrainingFailed(f"non-finite loss ({total}) at step {state.step + 1}; nothing was promoted: "
                                 "lower train.lr or check the data of the new increments")
    else:
        bad = ~torch.isfinite(step_total)
        state.first_bad_step = torch.where(bad & (state.first_bad_step < 0), state.step + 1, state.first_bad_step)

    lr = t.lr * lr_factor(state.step, total_steps=run.steps, warmup=warmup_steps(run.steps, t.warmup_ratio),
                          schedule=t.schedule, min_lr_ratio=t.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if t.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], t.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1

    state.lr = lr
    step_terms["total"] = step_total
    step_terms["steps"] = 1
    in_tail = state.step > run.steps - max(1, math.ceil(run.steps * TAIL_FRACTION))
    for name, value in step_terms.items():
        state.window[name] = state.window.get(name, 0) + value
        if in_tail:
            state.tail[name] = state.tail.get(name, 0) + value
    return total if check_loss else None


def _log_line(run: Run, state: TrainState, seconds: float) -> dict[str, Any]:
    """Read the window sums from the device (all ranks) and start a new window."""
    names = [*run.term_names, "total"]
    values = torch.stack([torch.as_tensor(state.window.get(n, 0.0), device=run.device, dtype=torch.float32)
                          for n in names] + [torch.tensor(float(state.local_tokens_since_log), device=run.device)])
    values = run.ctx.all_reduce_sum(values).tolist()
    steps = max(1, state.window.get("steps", 1))
    tokens = int(values[-1])
    state.tokens += tokens
    line = {"step": state.step, **{n: values[i] / steps for i, n in enumerate(names)}, "lr": state.lr,
            "tokens": state.tokens, "tokens_per_second": tokens / seconds if seconds > 0 else None}
    state.window, state.local_tokens_since_log = {}, 0
    return line


def _tail_losses(run: Run, state: TrainState) -> dict[str, float | None]:
    names = [*run.term_names, "total"]
    steps = max(1, state.tail.get("steps", 1))
    values = torch.stack([torch.as_tensor(state.tail.get(n, 0.0), device=run.device, dtype=torch.float32)
                          for n in names])
    values = run.ctx.all_reduce_sum(values).tolist()
    out: dict[str, float | None] = {n: None for n in ("mlm_new", "mlm_replay", "distill", "hidden", "ewc")}
    out.update({n: values[i] / steps for i, n in enumerate(names)})
    return out


# ----------------------------------------------------------------------------- building a run


def freeze_parameters(model: nn.Module, train: TrainConfig, reporter: Reporter) -> int:
    """Apply ``train.freeze`` (regexes on parameter names) and ``train.freeze_lower_layers``
    (embeddings + the lowest N encoder layers); -> the number of trainable parameters.

    Tied weights are one parameter: freezing the word embeddings also freezes a tied decoder.
    """
    patterns = []
    for pattern in train.freeze:
        try:
            patterns.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"train.freeze: {pattern!r} is not a regular expression ({exc})") from None
    prefix = getattr(model, "base_model_prefix", "")
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", 0)
    lower = train.freeze_lower_layers
    if lower > n_layers:
        raise UsageError(f"train.freeze_lower_layers={lower}: the model has only {n_layers} layers")
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(?:encoder|transformer)\.layers?\.(\d+)\.")
    used = [False] * len(patterns)
    for name, param in model.named_parameters():
        frozen = False
        for i, pattern in enumerate(patterns):
            if pattern.search(name):
                frozen = used[i] = True
        if lower:
            layer = layer_re.match(name)
            frozen |= name.startswith(f"{prefix}.embeddings.") or bool(layer and int(layer.group(1)) < lower)
        param.requires_grad_(not frozen)
    for pattern, hit in zip(train.freeze, used):
        if not hit:
            reporter.warn(f"train.freeze: {pattern!r} matches no parameter name (e.g. {next(iter(dict(model.named_parameters())))})")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise UsageError("train.freeze / train.freeze_lower_layers freeze every parameter; nothing would train")
    return trainable


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights (1-d).

    The fused kernel (one pass over all parameters) where torch has it for the device: CUDA, and
    CPU since torch 2.4, where it is several times faster than the per-tensor loop on a
    MiniLM-sized model. Older torch falls back to the default implementation.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    options = {"lr": train.lr, "betas": (train.adam_beta1, train.adam_beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(groups, **options)


def build_run(model: nn.Module, tok_inputs: dict[str, Any], new: list[IncrementShards],
              replay: list[IncrementShards], recipe: Recipe, plan: IncrementPlan, *, device: torch.device,
              precision: str, ctx: distributed.DistContext, reporter: Reporter) -> tuple[Run, int]:
    """Teacher (a frozen copy of ``model`` as it is now), student, optimizer and sampler -> (run, trainable)."""
    has_replay = plan.replay_per_batch > 0
    terms = build_loss_terms(recipe, has_replay)
    teacher = None
    if any(term.needs_teacher for term in terms):
        teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
        if device.type == "cuda" and precision == "bf16":
            teacher_model = teacher_model.to(torch.bfloat16)  # half the memory and bandwidth; never trained
        teacher = MaskedLMHead(teacher_model)
    model.train()
    trainable = freeze_parameters(model, recipe.train, reporter)
    head = MaskedLMHead(model)
    student: nn.Module = head
    ddp = None
    if ctx.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
        student = ddp
    if recipe.runtime.compile:
        student = torch.compile(student)
    sampler = BatchSampler(new, replay if has_replay else [], n_new=plan.new_per_batch,
                           n_replay=plan.replay_per_batch, seed=recipe.train.seed, sample=recipe.data.sample,
                           rank=ctx.rank, world_size=ctx.world_size)
    word_starts = tok_inputs["word_starts"]
    run = Run(head=head, student=student, teacher=teacher, optimizer=build_optimizer(model, recipe.train),
              sampler=sampler, terms=terms, train=recipe.train, masking=recipe.masking,
              special_ids=tok_inputs["special_ids"].to(device), mask_token_id=tok_inputs["mask_token_id"],
              vocab_size=tok_inputs["vocab_size"], pad_id=int(new[0].pad_id),
              word_starts=word_starts.to(device) if word_starts is not None else None, device=device,
              precision=precision, steps=plan.steps, ctx=ctx, ddp=ddp)
    return run, trainable


# ----------------------------------------------------------------------------- eval and gate


def evaluate_lineage(run: Run, shards: dict[str, IncrementShards], increments: list[str], recipe: Recipe,
                     tok_inputs: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Held-out loss, perplexity and accuracy of the student now, per increment (with held-out rows)."""
    from incr_cli.evaluate import score_sequences

    scores = {}
    for inc in increments:
        if len(shards[inc].heldout) == 0:
            continue
        s = score_sequences(run.head, shards[inc].heldout, increment_id=inc, recipe=recipe, device=run.device,
                            precision=run.precision, **tok_inputs)
        scores[inc] = {k: _finite(s[k]) for k in ("loss", "perplexity", "accuracy")}
    return scores


def gate_checks(recipe: Recipe, before: dict[str, Any], after: dict[str, Any], new: list[str],
                replay: list[str]) -> tuple[bool, list[dict[str, Any]], dict[str, float | None]]:
    """-> (passed, checks, forgetting). Forgetting = relative perplexity change on each earlier increment."""
    def change(inc: str) -> float | None:
        b, a = before.get(inc, {}).get("perplexity"), after.get(inc, {}).get("perplexity")
        return None if a is None or b is None or b <= 0 else _finite(a / b - 1.0)

    forgetting = {inc: change(inc) for inc in replay if inc in before and inc in after}
    checks = []
    if recipe.gate.max_forgetting is not None:
        for inc, value in forgetting.items():
            checks.append({"check": "max_forgetting", "increment": inc, "value": value,
                           "limit": recipe.gate.max_forgetting,
                           "passed": value is not None and value <= recipe.gate.max_forgetting})
    if recipe.gate.min_improvement is not None:
        for inc in new:
            if inc in before and inc in after:
                rel = change(inc)
                improvement = None if rel is None else -rel
                checks.append({"check": "min_improvement", "increment": inc, "value": improvement,
                               "limit": recipe.gate.min_improvement,
                               "passed": improvement is not None and improvement >= recipe.gate.min_improvement})
    return all(c["passed"] for c in checks), checks, forgetting


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


# ----------------------------------------------------------------------------- the increment


@dataclass
class TrainResult:
    plan: IncrementPlan
    version: str | None = None
    promoted: bool = False
    metrics: dict[str, Any] | None = None
    message: str = ""
    dry_run: bool = False
    resumed_from: int | None = None


def train_increment(ws: Workspace, recipe: Recipe, *, parent: str | None = None, reporter: Reporter | None = None,
                    dry_run: bool = False) -> TrainResult:
    """Train the increments pending in ``parent``'s lineage (LATEST by default) into a new version.

    The caller holds the workspace lock (rank 0 only under torchrun). Raises GateRejected after
    writing a version that fails the gate, TrainingFailed on a non-finite loss, Interrupted on
    SIGINT/SIGTERM after saving resumable state.
    """
    reporter = reporter or Quiet()
    ctx = distributed.setup(recipe.runtime.device)
    try:
        plan = plan_increment(ws, recipe, parent, world_size=ctx.world_size)
        if dry_run:
            return TrainResult(plan, dry_run=True, message="dry run: nothing trained")
        if plan.nothing_to_train:
            return TrainResult(plan, message=f"nothing to train: every ingested increment is in {plan.parent}'s lineage")
        key = run_key(plan, recipe, _weights_sha(ws, plan.parent))
        finished = _finished_run(ws, plan, key, ctx, reporter)
        if finished is not None:
            return finished
        if ctx.is_main:
            ws.clean_staging()
        return _train(ws, recipe, plan, key, ctx, reporter)
    finally:
        ctx.close()


def _weights_sha(ws: Workspace, version: str) -> str:
    files = ws.version_manifest(version).get("files") or {}
    return str((files.get("model.safetensors") or {}).get("sha256"))


def _finished_run(ws: Workspace, plan: IncrementPlan, key: str, ctx: distributed.DistContext,
                  reporter: Reporter) -> TrainResult | None:
    """A version this exact run already wrote (a run killed before LATEST moved, or a rejected one)."""
    for version in reversed(ws.versions()):
        manifest = ws.version_manifest(version)
        if manifest.get("run_key") != key:
            continue
        metrics = _read_metrics(ws, version)
        if ctx.is_main:  # left by a run killed after writing the version, before removing its state
            ResumeStore(ws, key).clear()
        result = TrainResult(plan, version, bool(manifest.get("promoted")), metrics)
        if not result.promoted:
            exc = GateRejected(f"{version} was already trained from {plan.parent} on this data with this recipe and "
                               f"failed the gate; LATEST stays {ws.latest()}. Change the recipe or ingest more data")
            exc.result = result  # type: ignore[attr-defined]
            raise exc
        if ctx.is_main and ws.latest() == plan.parent:
            fault_point("train.latest_update")
            ws.set_latest(version)
            reporter.log(f"{version} was written by an earlier run that stopped before LATEST moved; LATEST -> {version}")
        ctx.barrier()
        result.message = f"{version} already trained (same parent, data and recipe)"
        return result
    return None


def _read_metrics(ws: Workspace, version: str) -> dict[str, Any] | None:
    try:
        return json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _threads_per_rank(recipe: Recipe) -> int | None:
    if recipe.runtime.num_threads:
        return recipe.runtime.num_threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)  # ranks on one machine share its cores


def _check_tokenizer(shards: dict[str, IncrementShards], tokenizer_sha: str, parent: str) -> None:
    for inc, s in shards.items():
        recorded = s.manifest.get("tokenizer_sha256")
        if recorded and recorded != tokenizer_sha:
            raise InputError(f"{inc} was tokenized with a different tokenizer than {parent}'s; it cannot be trained "
                             "into this line: ingest it into a workspace of its own")


def _train(ws: Workspace, recipe: Recipe, plan: IncrementPlan, key: str, ctx: distributed.DistContext,
           reporter: Reporter) -> TrainResult:
    from incr_cli import models
    from incr_cli.evaluate import tokenizer_inputs

    started = time.perf_counter()
    device = ctx.device
    precision = devices.resolve_precision(recipe.runtime.precision, device)
    devices.configure_threads(_threads_per_rank(recipe))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer = models.load_version(ws, plan.parent, recipe=recipe, device=str(device), verify=ctx.is_main)
    shards = {d: open_increment(ws, d, verify=ctx.is_main) for d in dict.fromkeys([*plan.earlier, *plan.new])}
    _check_tokenizer(shards, models.tokenizer_sha256(tokenizer), plan.parent)
    tok_inputs = tokenizer_inputs(tokenizer, recipe)
    torch.manual_seed(recipe.train.seed * 7919 + ctx.rank)  # dropout stream; masks use their own seeds
    run, trainable = build_run(model, tok_inputs, [shards[d] for d in plan.new], [shards[d] for d in plan.replay],
                               recipe, plan, device=device, precision=precision, ctx=ctx, reporter=reporter)
    reporter.log(f"training {', '.join(plan.new)} into {plan.parent}'s line: {plan.steps} steps, "
                 f"{trainable:,} trainable parameters, {device} {precision}"
                 + (f", replay of {', '.join(plan.replay)}" if plan.replay_per_batch else "")
                 + (f", starting from {plan.init_from}'s weights" if plan.init_from else ""))
    # The student still holds the parent's weights: the EWC anchor and the "before" scores.
    run.terms += strategies.ewc_terms(ws, recipe, plan, run.model, shards, tok_inputs, device=device,
                                      precision=precision, reporter=reporter)
    store = ResumeStore(ws, key, rank=ctx.rank, barrier=ctx.barrier)
    state = TrainState(first_bad_step=torch.tensor(-1, device=device))
    resumed_from = None
    if store.current() is None:
        if ctx.is_main:
            state.eval_before = evaluate_lineage(run, shards, plan_increments(plan), recipe, tok_inputs)
        if plan.init_from:
            strategies.reset_weights(run.model, ws, plan.init_from, recipe, device)
    loaded = store.load(run.model, device)
    if loaded is not None:
        trainer, rng = loaded
        run.optimizer.load_state_dict(trainer["optimizer"])
        run.sampler.load_state_dict(trainer["sampler"])
        state = TrainState.from_dict(trainer["state"])
        restore_rng(rng, device)
        resumed_from = state.step
        reporter.log(f"resuming from step {state.step} of {plan.steps} ({store.current()})")

    per_step_check = device.type == "cpu" or bool(os.environ.get("INCR_FAULT"))
    meta = {"parent": plan.parent, "new": plan.new, "replay": plan.replay, "steps": plan.steps, "key": key}
    info = ""
    with StopSignal() as stop, reporter.progress(f"training {'+'.join(plan.new)}", total=plan.steps,
                                                  unit="steps") as bar:
        if state.step:
            bar.advance(state.step)
        # Time is read only where the device is synchronised anyway (log lines, saves), so it is
        # true on CUDA too; saves are not counted as training time.
        clock, seconds_at_log = time.perf_counter(), state.train_seconds
        while state.step < plan.steps:
            try:
                train_step(run, state, check_loss=per_step_check)
            except torch.cuda.OutOfMemoryError as exc:
                raise TrainingFailed(f"out of memory at step {state.step + 1} on {device}: lower train.batch_size "
                                     "(raise train.grad_accum to keep the effective batch) or model.max_seq_len; "
                                     f"{str(exc).splitlines()[0]}") from None
            fault_point("train.step")
            at_log = state.step % recipe.train.log_every == 0 or state.step == plan.steps
            save_every = recipe.runtime.save_every
            at_save = bool(save_every) and state.step % save_every == 0 and state.step < plan.steps
            stopping = stop.signum is not None
            if ctx.enabled:  # ranks stop together or not at all, agreed where they synchronise anyway
                agree = per_step_check or at_log or at_save
                stopping = agree and bool(ctx.all_reduce_sum(torch.tensor(float(stopping), device=device)).item())
            if at_log or at_save or stopping:
                _raise_if_bad(state)  # reads the device: the clock below is honest
                now = time.perf_counter()
                state.train_seconds += now - clock
                clock = now
            if at_log:
                line = _log_line(run, state, state.train_seconds - seconds_at_log)
                seconds_at_log = state.train_seconds
                state.log.append(line)
                tps = line["tokens_per_second"]
                info = f"loss {line['total']:.4f}" + (f"  {tps:,.0f} tok/s" if tps else "")
            bar.advance(1, info)
            if at_save or stopping:
                trainer = {"optimizer": run.optimizer.state_dict(), "sampler": run.sampler.state_dict(),
                           "state": state.to_dict()}
                store.save(state.step, run.model, trainer, capture_rng(device), meta)
                clock = time.perf_counter()
            if stopping:
                signum = stop.signum or signal.SIGTERM
                raise Interrupted(f"interrupted by {signal.Signals(signum).name} after step {state.step} of "
                                  f"{plan.steps}; state saved in {store.root}: run the same command to resume", signum)

    _raise_if_bad(state)
    losses = _tail_losses(run, state)  # a collective: every rank takes part
    if ctx.enabled:
        fingerprint = float(sum(p.detach().double().sum() for p in run.model.parameters()))
        if not ctx.all_equal(fingerprint):
            raise TrainingFailed("the ranks ended with different weights (a bug); nothing was promoted")

    result: TrainResult | None = None
    if ctx.is_main:
        result = _finish(ws, recipe, plan, key, run, state, shards, tok_inputs, tokenizer, trainable,
                         precision, started, resumed_from, store, losses)
    result = ctx.broadcast_object(result)
    if not result.promoted:
        checks = [c for c in result.metrics["gate"]["checks"] if not c["passed"]]
        failed = "; ".join(f"{c['check']} on {c['increment']}: {_fmt(c['value'])} (limit {c['limit']:g})" for c in checks)
        exc = GateRejected(f"{result.version} failed the gate ({failed}); it is kept as rejected and LATEST stays "
                           f"{plan.parent}")
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    return result


def plan_increments(plan: IncrementPlan) -> list[str]:
    """Every increment scored before and after: the lineage, then what this version adds."""
    return [*plan.earlier, *plan.pending]


def _raise_if_bad(state: TrainState) -> None:
    bad = int(state.first_bad_step.item()) if state.first_bad_step is not None else -1
    if bad >= 0:
        raise TrainingFailed(f"non-finite loss at step {bad}; nothing was promoted: lower train.lr or check the "
                             "data of the new increments")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2%}"


def _finish(ws: Workspace, recipe: Recipe, plan: IncrementPlan, key: str, run: Run, state: TrainState,
            shards: dict[str, IncrementShards], tok_inputs: dict[str, Any], tokenizer: Any, trainable: int,
            precision: str, started: float, resumed_from: int | None, store: ResumeStore,
            losses: dict[str, float | None]) -> TrainResult:
    """Rank 0: evaluate, gate, write the version, move LATEST when promoted."""
    from incr_cli import models

    after = evaluate_lineage(run, shards, plan_increments(plan), recipe, tok_inputs)
    before = state.eval_before or {}
    passed, checks, forgetting = gate_checks(recipe, before, after, plan.pending, plan.earlier)
    version = ws.next_version()
    parent_manifest = ws.version_manifest(plan.parent)
    total_params = sum(p.numel() for p in run.model.parameters())
    replayed = plan.replay if plan.replay_per_batch else []
    metrics = {
        "version": version, "parent": plan.parent, "promoted": passed,
        "status": "promoted" if passed else "rejected",
        "gate": {"passed": passed, "checks": checks},
        # replay: the earlier increments actually replayed; earlier: all of the lineage (evaluated)
        "data": {"new": plan.pending, "replay": replayed, "earlier": plan.earlier, "retrained": plan.retrained,
                 "new_sequences": plan.new_sequences, "replay_sequences": plan.replay_sequences if replayed else 0},
        "steps": state.step, "tokens": state.tokens,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds > 0 else None,
        "peak_memory_bytes": devices.peak_memory_bytes(run.device),
        "device": str(run.device), "precision": precision, "world_size": run.ctx.world_size,
        "trainable_parameters": trainable, "total_parameters": total_params,
        "loss": {k: _finite(v) for k, v in losses.items()},
        "eval": {"before": before, "after": after}, "forgetting": forgetting,
        "resumed_from_step": resumed_from,
    }
    manifest = {"version": version, "parent": plan.parent, "source": parent_manifest.get("source"),
                "head_initialised": parent_manifest.get("head_initialised", False),
                "trained_on": [*plan.earlier, *plan.pending], "new": plan.pending,
                "replay": replayed, "init_from": plan.init_from, "retrained": plan.retrained,
                "status": metrics["status"], "promoted": passed, "recipe": recipe_to_dict(recipe),
                "seeds": {"train": recipe.train.seed, "eval": recipe.eval.seed},
                "software": models.software_versions(), "device": str(run.device), "precision": precision,
                "world_size": run.ctx.world_size, "steps": state.step, "run_key": key}
    log = "".join(json.dumps(line) + "\n" for line in state.log)
    extra = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(), "train_log.jsonl": log.encode(),
             **strategies.version_files(recipe, plan, run.model, shards, tok_inputs, device=run.device,
                                        precision=precision)}
    run.model.eval()
    fault_point("train.version_write")
    models.save_version(ws, version, run.model, tokenizer, manifest, extra)
    store.clear()
    if passed:
        fault_point("train.latest_update")
        ws.set_latest(version)
    return TrainResult(plan, version, passed, metrics, message=f"{version} {metrics['status']}",
                       resumed_from=resumed_from)


__all__ = ["IncrementPlan", "TrainResult", "Run", "TrainState", "LossTerm", "MicroOutputs", "Normalisers",
           "plan_increment", "train_increment", "train_step", "build_run", "build_loss_terms", "build_optimizer",
           "freeze_parameters", "evaluate_lineage", "gate_checks", "run_key"]
