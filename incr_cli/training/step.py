"""One optimizer step and what it needs: the loss terms, the run (fixed) and its state (changing).

Loss of one optimizer step (sums over the accumulation window, each divided by its own token count
over the whole window and all ranks, so micro-batch boundaries do not change the result):

    L = mlm(new)/n_new + replay.weight * mlm(replay)/n_replay + alpha * kd(rows)/n_rows
        + hidden_weight * hidden(all tokens)/n_tokens

kd's rows are ``distill.rows``'s: the replayed rows (the default; the teacher then runs on them only),
the new rows, or all of them (n_rows: their masked targets).

With alpha = hidden_weight = 0 and replay.ratio = 0 this is exactly plain MLM fine-tuning. Each
term is a small object (``strategy.LossTerm``), so a strategy such as EWC plugs in as one more term.

Host synchronisation: one small read per step of the window's masked-token counts (the masked-only
head's gather is data-dependent anyway); loss values are read only every ``train.log_every`` steps
on CUDA. On CPU every step's loss is checked (it costs nothing there), so a non-finite loss stops
the run before the optimizer applies it.
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from incr_cli.config.recipe import Recipe, TrainConfig
from incr_cli.data.shards import BatchSampler, Draw, IncrementShards
from incr_cli.errors import InputError, TrainingFailed, UsageError, shown
from incr_cli.faults import fault_value
from incr_cli.model.heads import MaskedLMHead
from incr_cli.progress import Reporter
from incr_cli.runtime import distributed
from incr_cli.runtime.device import Placement
from incr_cli.runtime.flops import Meter, device_peak, model_shape
from incr_cli.store.files import finite_json
from incr_cli.training.masking import TokenIds, mask_batch, stable_seed
from incr_cli.training.plan import IncrementPlan
from incr_cli.training.schedule import decay_steps, lr_factor, warmup_steps
from incr_cli.training.terms import LossTerm, MicroOutputs, Normalisers, rows_count, rows_slice, teacher_rows

TAIL_FRACTION = 0.1  # metrics' losses average the last 10% of steps


# ----------------------------------------------------------------------------- the run and its state


@dataclass
class Run:
    """Everything fixed during a run. The student is one network under three handles: ``student``
    is what the loop calls (maybe wrapped by DDP / torch.compile), ``student_head`` the plain
    masked-only head, ``model`` the Hugging Face model inside it (what is saved)."""

    student_head: MaskedLMHead
    student: nn.Module
    teacher: MaskedLMHead | None
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    terms: list[LossTerm]
    train: TrainConfig
    masking: Any  # MaskingConfig
    tokens: TokenIds  # what masking takes from the tokenizer, its tensors on the device
    pad_id: int
    place: Placement
    steps: int
    ctx: distributed.DistContext
    ddp: nn.Module | None = None
    meter: Meter | None = None  # model FLOPs and the device peak, for the log's MFU

    @property
    def model(self) -> nn.Module:
        return self.student_head.model

    @property
    def device(self) -> torch.device:
        return self.place.device

    @property
    def precision(self) -> str:
        return self.place.precision

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


def _zeros(run: Run, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros((), dtype=torch.float32, device=run.device) for n in names}


def _require_targets(run: Run, state: TrainState, targets: float) -> None:
    """A step window without a single target teaches nothing: stop (every rank sees the same all-reduced
    count, so all stop here) rather than train on, or promote, text the tokenizer cannot represent."""
    if targets == 0:
        names = ", ".join(s.id for s in run.sampler.new_pool.shards)
        raise InputError(f"{names}: step {state.step} drew no maskable token (all special or unknown [UNK]); "
                         "nothing was promoted: ingest text the tokenizer covers")


def train_step(run: Run, state: TrainState, *, check_loss: bool) -> float | None:
    """One optimizer step over ``train.grad_accum`` micro-batches; updates ``state``.

    Returns the step's total loss (all ranks) when ``check_loss`` (read from the device), else None.
    Raises TrainingFailed on a non-finite loss before the optimizer applies it.
    """
    micros, norm, n_masked = _mask_window(run, state)
    step_terms, step_total = _forward_backward(run, micros, norm)
    total = None
    if check_loss:
        total = fault_value("train.loss", run.ctx.all_reduce_sum(step_total.clone()).item())
        if not math.isfinite(total):
            raise TrainingFailed(f"non-finite loss ({total}) at step {state.step + 1}; nothing was promoted: "
                                 "lower train.lr or check the data of the new increments")
    else:
        bad = ~torch.isfinite(step_total)
        state.first_bad_step = torch.where(bad & (state.first_bad_step < 0), state.step + 1, state.first_bad_step)
    grad_norm = _optimizer_step(run, state)
    step_terms["total"] = step_total
    step_terms["steps"] = 1
    in_tail = state.step > run.steps - max(1, math.ceil(run.steps * TAIL_FRACTION))
    for name, value in step_terms.items():
        state.window[name] = state.window.get(name, 0) + value
        if in_tail:
            state.tail[name] = state.tail.get(name, 0) + value
    _count_for_log(state, grad_norm, [masked.input_ids for masked, *_ in micros], n_masked)
    return total


def _mask_window(run: Run, state: TrainState) -> tuple[list[tuple[Any, torch.Tensor, int, int]], Normalisers, float]:
    """Draw and mask the whole accumulation window first: its token counts normalise every term.

    -> ([(masked batch, attention mask (B, T), masked targets of new rows, new rows)] per micro-batch,
    normalisers, masked positions of the window on all ranks).
    """
    t, dev = run.train, run.device
    generator = torch.Generator(device=dev)
    micros = []
    for m in range(t.grad_accum):
        batch = run.sampler.next_batch()
        ids_np = batch.input_ids  # (B, T) new rows first
        state.local_tokens_since_log += int((ids_np != run.pad_id).sum())
        ids = torch.from_numpy(ids_np)
        ids = ids.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else ids
        # seeded by the micro-batch's place in the global window (as one process accumulating
        # world_size times as many would number it), so the masks do not depend on the rank count
        micro = m * run.ctx.world_size + run.ctx.rank
        generator.manual_seed(stable_seed("train-mask", t.seed, 0, state.step, micro))
        masked = mask_batch(ids, run.masking, run.tokens, generator=generator,
                            continues=None if batch.continues is None else torch.from_numpy(batch.continues).to(dev))
        micros.append((masked, ids != run.pad_id, len(batch.new_ids)))
    counts = torch.stack([torch.stack([p.positions[:n].sum(), p.positions[n:].sum(), a.sum()])
                          for p, a, n in micros]).float()  # (M, 3)
    window = run.ctx.all_reduce_sum(counts.sum(0))
    host = torch.cat([counts[:, 0], window]).tolist()  # the step's one host read
    per_micro_new, (n_new, n_replay, n_tokens) = host[:-3], host[-3:]
    _require_targets(run, state, n_new + n_replay)
    norm = Normalisers(max(n_new, 1.0), max(n_replay, 1.0), max(n_new + n_replay, 1.0), max(n_tokens, 1.0))
    micros = [(masked, attention, int(k), rows) for (masked, attention, rows), k in zip(micros, per_micro_new)]
    return micros, norm, n_new + n_replay


def _forward_backward(run: Run, micros: list[tuple[Any, torch.Tensor, int, int]], norm: Normalisers
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward (student, and teacher when a term needs it: on the rows ``teacher_rows`` says) and
    backward per micro-batch.

    -> (each term's sum over the window, the weighted total), on the device."""
    dev = run.device
    need_teacher = any(term.needs_teacher for term in run.terms)
    need_hidden = any(term.needs_hidden for term in run.terms)
    on = teacher_rows(run.terms)
    step_terms = _zeros(run, run.term_names)
    step_total = torch.zeros((), dtype=torch.float32, device=dev)
    for m, (masked, attention, n_new_targets, n_new_rows) in enumerate(micros):
        sync = run.ddp.no_sync() if run.ddp is not None and m < len(micros) - 1 else nullcontext()
        with sync:
            with run.place.autocast():
                logits, hidden = run.student(masked.input_ids, attention, masked.positions, output_hidden=need_hidden)
            out = MicroOutputs(logits, masked.targets, n_new_targets, attention, norm, run.model, m,
                               len(micros), run.ctx.world_size, student_hidden=hidden)
            if need_teacher:
                rows = rows_slice(on, n_new_rows)
                with torch.inference_mode(), run.place.autocast():
                    t_logits, t_hidden = run.teacher(masked.input_ids[rows], attention[rows], masked.positions[rows],
                                                     output_hidden=need_hidden)
                out.teacher_logits, out.teacher_hidden, out.teacher_rows = t_logits, t_hidden, on  # losses detach
            loss = torch.zeros((), dtype=torch.float32, device=dev)
            for term in run.terms:
                value = term(out)
                step_terms[term.name] += value.detach()
                loss = loss + term.weight * value
            step_total += loss.detach()
            # DDP averages gradients over ranks; the terms are already global means, so undo it.
            (loss * run.ctx.world_size).backward()
    return step_terms, step_total


def _optimizer_step(run: Run, state: TrainState) -> torch.Tensor:
    """Set the scheduled learning rate, clip, apply the optimizer; ``state.step`` counts it.
    -> the gradients' norm before clipping (a device scalar)."""
    t = run.train
    warmup = warmup_steps(run.steps, t.warmup_ratio)
    lr = t.lr * lr_factor(state.step, total_steps=run.steps, warmup=warmup, schedule=t.schedule,
                          min_lr_ratio=t.min_lr_ratio, decay=decay_steps(run.steps, warmup, t.decay_ratio))
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    grad_norm = _grad_norm([p for g in run.optimizer.param_groups for p in g["params"]], t.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.lr = lr
    return grad_norm


def _count_for_log(state: TrainState, grad_norm: torch.Tensor, input_ids: list[torch.Tensor], masked: float) -> None:
    """Add one step to the log window: the norm stays on the device; rows (this rank's, (B, T) each)
    and masked positions (all ranks) are host numbers already known, for the line's MFU."""
    window = state.window
    window["grad_norm"] = window.get("grad_norm", 0) + grad_norm.detach().float()
    window["rows"] = window.get("rows", 0) + sum(ids.shape[0] for ids in input_ids)
    window["seq"] = int(input_ids[0].shape[1])
    window["masked"] = window.get("masked", 0.0) + masked


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm before clipping, a device scalar; clips to ``max_norm`` when > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # returns the norm it computed
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one fused pass
    if total_norm is not None:
        return total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def log_line(run: Run, state: TrainState, seconds: float) -> dict[str, Any]:
    """Read the window sums from the device (all ranks, one read) and start a new window.

    Losses and ``grad_norm`` (before clipping) are means over the window's steps; ``lr`` is the last
    step's; ``mfu`` is the window's model FLOP/s over the device peak (None when unknown).
    """
    window = state.window
    names = [*run.term_names, "total", "grad_norm"]
    values = torch.stack([torch.as_tensor(window.get(n, 0.0), device=run.device, dtype=torch.float32)
                          for n in names] + [torch.tensor(float(state.local_tokens_since_log), device=run.device),
                                             torch.tensor(float(window.get("rows", 0)), device=run.device)])
    values = run.ctx.all_reduce_sum(values).tolist()
    values[len(names) - 1] /= run.ctx.world_size  # every rank holds the same (all-reduced) gradients
    steps = max(1, window.get("steps", 1))
    tokens, rows = int(values[-2]), values[-1]
    state.tokens += tokens
    line = {"step": state.step, **{n: finite_json(values[i] / steps) for i, n in enumerate(names)}, "lr": state.lr,
            "tokens": state.tokens, "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "mfu": run.meter.mfu(rows, window.get("seq", 0), window.get("masked", 0.0), seconds) if run.meter else None}
    state.window, state.local_tokens_since_log = {}, 0
    return line


def tail_losses(run: Run, state: TrainState) -> dict[str, float]:
    """The mean of each of the run's loss terms (and the total) over the tail of the steps, every rank's."""
    names = [*run.term_names, "total"]
    steps = max(1, state.tail.get("steps", 1))
    values = torch.stack([torch.as_tensor(state.tail.get(n, 0.0), device=run.device, dtype=torch.float32)
                          for n in names])
    values = run.ctx.all_reduce_sum(values).tolist()
    return {n: values[i] / steps for i, n in enumerate(names)}


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
            raise UsageError(f"train.freeze: {shown(pattern)} is not a regular expression ({exc})") from None
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
            reporter.warn(f"train.freeze: {shown(pattern)} matches no parameter name (e.g. {next(iter(dict(model.named_parameters())))})")
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


@dataclass(frozen=True)
class RunSpec:
    """What a run trains: the recipe and the plan (steps, rows per batch), the data it draws (the new and
    the replayed increments' shards, the tokenizer's ids that masking takes) and the loss terms."""

    recipe: Recipe
    plan: IncrementPlan
    new: list[IncrementShards]
    replay: list[IncrementShards]
    tokens: TokenIds
    terms: list[LossTerm]


def build_run(model: nn.Module, spec: RunSpec, *, place: Placement, ctx: distributed.DistContext,
              reporter: Reporter, teacher: nn.Module | None = None) -> tuple[Run, int]:
    """Teacher, student, optimizer and sampler for ``spec`` -> (run, trainable parameters). The teacher,
    when a term needs one, is ``teacher`` or else a frozen copy of ``model`` as it is now (the parent)."""
    recipe, plan, device = spec.recipe, spec.plan, place.device
    teacher_head = None
    if any(term.needs_teacher for term in spec.terms):
        if teacher is None:
            teacher = copy.deepcopy(model)
            if place.precision == "bf16":  # never trained: half the memory, and no autocast copies of its weights
                teacher = teacher.to(torch.bfloat16)
        teacher_head = MaskedLMHead(teacher.to(device).eval().requires_grad_(False))
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
    draw = Draw(plan.new_per_batch, plan.replay_per_batch, recipe.train.seed, recipe.data.sample, recipe.replay.split)
    sampler = BatchSampler(spec.new, spec.replay if plan.replay_per_batch > 0 else [], draw, rank=ctx.rank,
                           world_size=ctx.world_size)
    run = Run(student_head=head, student=student, teacher=teacher_head, optimizer=build_optimizer(model, recipe.train),
              sampler=sampler, terms=list(spec.terms), train=recipe.train, masking=recipe.masking,
              tokens=spec.tokens.to(device), pad_id=int(spec.new[0].pad_id), place=place, steps=plan.steps, ctx=ctx,
              ddp=ddp)
    if ctx.is_main:  # only rank 0 writes the log
        run.meter = _meter(run, compiled=recipe.runtime.compile)
    return run, trainable


def _meter(run: Run, *, compiled: bool) -> Meter | None:
    """What this run computes per row (for the log's MFU); None for a model the FLOP formula does not know."""
    shape = model_shape(run.model.config)
    if shape is None:
        return None
    need_hidden = any(term.needs_hidden for term in run.terms)
    peak, source = device_peak(run.device, run.precision)
    n_new, n_replay = run.sampler.n_new, run.sampler.n_replay
    share = rows_count(teacher_rows(run.terms), n_new, n_replay) / (n_new + n_replay)
    return Meter(shape, teacher=share if run.teacher is not None else 0.0,
                 last_layer_masked=run.student_head.masked_last_layer and not need_hidden and not compiled,
                 head_all_positions=run.student_head.kind == "full", peak_flops_per_s=peak, peak_source=source,
                 devices=run.ctx.world_size)
