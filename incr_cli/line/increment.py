"""One increment of training: the loop, before/after eval, the gate, and the new version.

``train_increment`` reads top to bottom: plan what to train (``plan.py``) -> load the parent
(teacher and student) -> resume or evaluate the parent -> ``train_step`` (``step.py``) until the
budget is spent -> evaluate -> gate -> write ``checkpoints/vNNNN`` -> move ``LATEST`` when promoted.
Every strategy runs this one loop; they differ only in the data the sampler draws (new / replay
rows) and in the loss terms: ``strategy.Strategy`` (looked up by ``strategy.name``) says which.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from incr_cli import tracking
from incr_cli.config.recipe import Recipe, recipe_to_dict
from incr_cli.data.shards import IncrementShards, check_tokenizer, open_increment
from incr_cli.errors import GateRejected, InputError, Interrupted, TrainingFailed
from incr_cli.faults import fault_point
from incr_cli.methods import get_strategy, loss_terms, merge, plan_increment, reported_loss_names
from incr_cli.methods.base import Strategy, StrategyInputs
from incr_cli.model import vocab
from incr_cli.model import weights as models
from incr_cli.model.packaging import packaging_files
from incr_cli.progress import Quiet, Reporter
from incr_cli.runtime import device as devices
from incr_cli.runtime import distributed
from incr_cli.runtime.device import Placement
from incr_cli.scoring import embed, probe
from incr_cli.scoring.cache import ScoreBook, weights_checksum
from incr_cli.scoring.continual import gate_line
from incr_cli.scoring.gate import gate_sample
from incr_cli.scoring.score import CELL_KEYS, HeldOut, score_sequences
from incr_cli.store.files import finite_json
from incr_cli.store.workspace import Workspace
from incr_cli.training.checkpointing import ResumeStore, StopSignal, capture_rng, restore_rng
from incr_cli.training.masking import TokenIds, tokenizer_inputs
from incr_cli.training.plan import IncrementPlan, run_key
from incr_cli.training.step import Run, RunSpec, TrainState, build_run, log_line, tail_losses, train_step

# ----------------------------------------------------------------------------- eval and gate


def evaluate_lineage(run: Run, shards: dict[str, IncrementShards], increments: list[str], recipe: Recipe,
                     tok_inputs: TokenIds, *, limits: vocab.VocabLimits = vocab.NO_LIMITS
                     ) -> dict[str, dict[str, float | None]]:
    """Held-out scores of the student now (``evaluate.CELL_KEYS``), per increment with held-out rows.

    Masks come from each increment's own vocabulary; ``limits.model_vocab`` scores the student as the
    version it grew from (the parent's vocabulary: the "before" of a run that grows it),
    ``limits.valid_below`` only at positions whose target id is below it (see ``score.score_sequences``)."""
    scores = {}
    for inc in increments:
        shard = shards[inc]
        if len(shard.heldout) == 0:
            continue
        tokens = tok_inputs.of_vocab(shard.manifest.get("vocab_size") or tok_inputs.vocab_size)
        s = score_sequences(run.student_head, HeldOut(inc, shard.heldout, shard.heldout_words), recipe=recipe,
                            tokens=tokens, place=run.place, limits=limits)
        scores[inc] = {k: finite_json(s[k]) for k in CELL_KEYS}
    return scores


def before_scores(s: Session) -> dict[str, dict[str, Any]]:
    """The parent's scores on the gate's increments (``evaluate.gate_sample``): read from the score
    book where recorded (the parent's own "after", or an eval), scored now (and recorded) only where
    not; each entry says which ("source": "recorded" or "scored"). A student grown from the parent's
    vocabulary is scored as the parent (``incr eval``'s cell)."""
    ws, plan = s.ws, s.plan
    book = ScoreBook(ws, s.recipe, s.run.precision)
    parent_sha = weights_checksum(ws.version_manifest(plan.parent))
    before, missing = {}, []
    for inc in gate_sample(ws, s.recipe, plan.pending, plan.earlier):
        hit = book.get(parent_sha, inc)
        if hit is None:
            missing.append(inc)
        else:
            before[inc] = {**hit, "source": "recorded"}
    as_parent = vocab.VocabLimits(model_vocab=s.growth.parent_size) if s.growth else vocab.NO_LIMITS
    for inc, scores in evaluate_lineage(s.run, s.shards, missing, s.recipe, s.tok_inputs, limits=as_parent).items():
        book.put(parent_sha, plan.parent, inc, scores)
        before[inc] = {**scores, "source": "scored"}
    return before


def _record_after(ws: Workspace, recipe: Recipe, precision: str, version: str, manifest: dict[str, Any],
                  after: dict[str, dict[str, Any]]) -> None:
    """The new version's scores into the score book: the next version's "before", and incr eval's cells."""
    book, weights = ScoreBook(ws, recipe, precision), weights_checksum(manifest)
    for inc, scores in after.items():
        book.put(weights, version, inc, scores)


def _gate_sample(recipe: Recipe, plan: IncrementPlan, shards: dict[str, IncrementShards], before: dict[str, Any],
                 after: dict[str, Any]) -> dict[str, Any]:
    """What the gate scored (metrics.json): the increments, the sequences, and where "before" came from."""
    return {"budget": recipe.eval.gate_sequences, "scored": list(after),
            "skipped": [d for d in plan.trained_on if d not in after],
            "sequences": sum(min(len(shards[d].heldout), recipe.eval.max_sequences) for d in after),
            "before_recorded": [d for d, s in before.items() if s.get("source") == "recorded"],
            "before_scored": [d for d, s in before.items() if s.get("source") != "recorded"]}


def _shown(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scores as metrics.json keeps them: loss, perplexity, accuracy, coverage."""
    return {inc: {k: s.get(k) for k in ("loss", "perplexity", "accuracy", "coverage")} for inc, s in scores.items()}


def gate_checks(recipe: Recipe, before: dict[str, Any], after: dict[str, Any], pending: list[str],
                earlier: list[str]) -> tuple[bool, list[dict[str, Any]], dict[str, float | None]]:
    """-> (passed, checks, ppl_change): ``ppl_change`` is the relative perplexity change (after / before - 1)
    on each earlier increment, what ``gate.max_forgetting`` limits and ``metrics.json`` reports as
    ``forgetting``; ``gate.min_improvement`` limits its negative on the pending increments."""
    def change(inc: str) -> float | None:
        b, a = before.get(inc, {}).get("perplexity"), after.get(inc, {}).get("perplexity")
        return None if a is None or b is None or b <= 0 else finite_json(a / b - 1.0)

    ppl_change = {inc: change(inc) for inc in earlier if inc in before and inc in after}
    checks = []
    if recipe.gate.max_forgetting is not None:
        for inc, value in ppl_change.items():
            checks.append({"check": "max_forgetting", "increment": inc, "value": value,
                           "limit": recipe.gate.max_forgetting,
                           "passed": value is not None and value <= recipe.gate.max_forgetting})
    if recipe.gate.min_improvement is not None:
        for inc in pending:
            if inc in before and inc in after:
                rel = change(inc)
                improvement = None if rel is None else -rel
                checks.append({"check": "min_improvement", "increment": inc, "value": improvement,
                               "limit": recipe.gate.min_improvement,
                               "passed": improvement is not None and improvement >= recipe.gate.min_improvement})
    return all(c["passed"] for c in checks), checks, ppl_change


def ppl_deltas(before: dict[str, Any], after: dict[str, Any], incs: list[str]) -> dict[str, float | None]:
    """Held-out perplexity after minus before on each of ``incs`` (positive = forgot), rounded to 4 places."""
    def delta(inc: str) -> float | None:
        b, a = before.get(inc, {}).get("perplexity"), after.get(inc, {}).get("perplexity")
        return None if a is None or b is None else finite_json(round(a - b, 4))

    return {inc: delta(inc) for inc in incs}


def _require_scores(after: dict[str, dict[str, Any]], new: list[str]) -> None:
    """A new increment with held-out rows but no scored token (all [UNK] or special) leaves the gate
    nothing to compare: refuse it rather than promote a version nobody can judge."""
    # accuracy is None only when no token was scored
    unscored = [inc for inc in new if inc in after and after[inc].get("accuracy") is None]
    if unscored:
        raise InputError(f"{unscored[0]}: no held-out token could be scored (all are special or unknown [UNK]), so "
                         "the gate has nothing to compare and nothing was promoted; ingest text the tokenizer covers")


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
    ctx = distributed.setup(recipe.runtime.device, recipe.runtime.collective_timeout)
    try:
        plan = plan_increment(ws, recipe, parent, world_size=ctx.world_size)
        tasks = probe.load_tasks(recipe)  # a bad task file ends here (exit 2), before a night of training
        if dry_run:
            return TrainResult(plan, dry_run=True, message="dry run: nothing trained")
        with tracking.session(recipe.tracking, ws.root, reporter, enabled=ctx.is_main) as tracker:
            tracker.reconcile(ws)  # first: runs a killed command left open in the dashboards
            if plan.nothing_to_train:
                return TrainResult(plan, message=f"nothing to train: every ingested increment is in {plan.parent}'s lineage")
            key = run_key(plan, recipe, _weights_sha(ws, plan.parent))
            finished = _finished_run(ws, plan, key, ctx, reporter)
            if finished is not None:
                return finished
            if ctx.is_main:
                ws.clean_staging()
            return _train(ws, _Job(plan, key, ctx, reporter, tracker), recipe, tasks)
    finally:
        # Returns and GateRejected end every rank alike (the result is broadcast); other errors may not.
        ctx.close(together=sys.exc_info()[0] in (None, GateRejected))


def _weights_sha(ws: Workspace, version: str) -> str:
    files = ws.version_manifest(version).get("files") or {}
    return str((files.get("model.safetensors") or {}).get("sha256"))


def _finished_run(ws: Workspace, plan: IncrementPlan, key: str, ctx: distributed.DistContext,
                  reporter: Reporter) -> TrainResult | None:
    """A version this exact run already wrote (a run killed before LATEST moved, or a rejected one)."""
    for version in reversed(ws.versions()):
        if int(version[1:]) <= int(plan.parent[1:]):
            break  # a run from the parent writes a newer version: the nightly case reads no manifest
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
            ws.move_latest(version, command="train-increment", reason="passed the gate (completed by a rerun)")
            reporter.log(f"{version} was written by an earlier run that stopped before LATEST moved; LATEST -> {version}")
        ctx.barrier()
        result.message = f"{version} already trained (same parent, data and recipe)"
        return result
    return None


def _superseded_states(ws: Workspace, plan: IncrementPlan, key: str) -> list[dict[str, Any]]:
    """Resumable states of other interrupted runs from this run's parent (the recipe or the data
    changed since), and unreadable ones: a version from the parent makes them stale."""
    return [s for s in ws.resume_states() if s["key"] != key and (s["parent"] == plan.parent or s["step"] is None)]


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


# ----------------------------------------------------------------------------- the run, in phases


@dataclass(frozen=True)
class _Job:
    """A planned run: what setting it up starts from (on every rank), beside the workspace and the recipe."""
    plan: IncrementPlan
    key: str  # the run key (run_key() in plan.py): where resumable state and the finished version are recorded
    ctx: distributed.DistContext
    reporter: Reporter
    tracker: tracking.Tracker  # TensorBoard / MLflow sinks (rank 0; a no-op elsewhere)


@dataclass
class Session:
    """One training run after planning: what its phases share (on every rank)."""

    ws: Workspace
    recipe: Recipe
    plan: IncrementPlan
    key: str  # the run key (run_key() in plan.py): where resumable state and the finished version are recorded
    ctx: distributed.DistContext
    reporter: Reporter
    started: float  # time.perf_counter() when the run started
    run: Run  # its ``place``: the device and precision of the run
    trainable: int  # trainable parameters
    shards: dict[str, IncrementShards]  # the lineage's and the new increments, opened
    tokenizer: Any
    tok_inputs: TokenIds  # masking.tokenizer_inputs
    strategy: Strategy
    store: ResumeStore
    tracker: tracking.Tracker  # TensorBoard / MLflow sinks (rank 0; a no-op elsewhere)
    resumed_from: int | None = None  # the step a resumed run continued from
    growth: vocab.Growth | None = None  # the vocabulary the student grew by (vocab.py), if it grew
    tasks: list[Any] = field(default_factory=list)  # the recipe's downstream tasks, read (tasks.TaskData)

    @property
    def place(self) -> Placement:
        return self.run.place

    def strategy_inputs(self, reporter: Reporter) -> StrategyInputs:
        return StrategyInputs(self.ws, self.recipe, self.plan.parent, self.plan.new, self.plan.replay,
                              self.run.model, self.shards, self.tok_inputs, self.place, reporter)


def _train(ws: Workspace, job: _Job, recipe: Recipe, tasks: list[Any]) -> TrainResult:
    """Set up the run -> resume it or score the parent -> the step loop -> finish (rank 0: the version)."""
    plan, ctx, tracker = job.plan, job.ctx, job.tracker
    session = _set_up(ws, job, recipe)
    session.tasks = tasks
    state = _resume_or_score_parent(session)
    _step_loop(session, state)
    losses = _agree_on_the_end(session, state)
    result: TrainResult | None = None
    if ctx.is_main:
        result = _finish(session, state, losses)
        tracker.finish(result.metrics, ws.version_dir(result.version))
    result = ctx.broadcast_object(result)
    if not result.promoted:
        checks = [c for c in result.metrics["gate"]["checks"] if not c["passed"]]
        failed = "; ".join(gate_line(c) for c in checks)
        exc = GateRejected(f"{result.version} failed the gate ({failed}); it is kept as rejected and LATEST stays "
                           f"{plan.parent}")
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    return result


def _set_up(ws: Workspace, job: _Job, recipe: Recipe) -> Session:
    """Load the parent (student and teacher), open the data, build the run and the strategy's extra terms."""
    plan, key, ctx, reporter = job.plan, job.key, job.ctx, job.reporter
    started = time.perf_counter()
    place = Placement.resolve(ctx.device, recipe.runtime.precision)
    device = place.device
    devices.configure_threads(_threads_per_rank(recipe))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, tokenizer, growth = _load_parent(ws, recipe, plan, device, ctx, reporter)
    with ws.verifying_many():
        shards = {d: open_increment(ws, d, verify=ctx.is_main) for d in dict.fromkeys([*plan.earlier, *plan.new])}
    tok_inputs = tokenizer_inputs(tokenizer, recipe)
    torch.manual_seed(recipe.train.seed * 7919 + ctx.rank)  # dropout stream; masks use their own seeds
    terms = loss_terms(recipe, plan, shared_vocab=growth.parent_size if growth else None)
    spec = RunSpec(recipe, plan, [shards[d] for d in plan.new], [shards[d] for d in plan.replay], tok_inputs, terms)
    run, trainable = build_run(model, spec, place=place, ctx=ctx, reporter=reporter)
    reporter.log(f"training {', '.join(plan.new)} into {plan.parent}'s line: {plan.steps} steps, "
                 f"{trainable:,} trainable parameters, {device} {place.precision}"
                 + (f", replay of {', '.join(plan.replay)}" if plan.replay_per_batch else "")
                 + (f", starting from {plan.init_from}'s weights" if plan.init_from else ""))
    _log_full_head(run, reporter)
    if plan.uncovered:
        rows = ", ".join(f"{d} {plan.replay_rows[d]:.2f}" for d in plan.uncovered[:5])
        reporter.warn(f"replay: {len(plan.uncovered)} earlier increment(s) get less than one replayed row in this run "
                      f"in expectation ({rows}{', ...' if len(plan.uncovered) > 5 else ''}; replay.split="
                      f"{recipe.replay.split}): set replay.split=increment or raise replay.ratio or the steps")
    store = ResumeStore(ws, key, rank=ctx.rank, barrier=ctx.barrier)
    session = Session(ws, recipe, plan, key, ctx, reporter, started, run, trainable, shards, tokenizer,
                      tok_inputs, get_strategy(recipe.strategy.name), store, job.tracker, growth=growth)
    # The student still holds the parent's weights: the EWC anchor (and, next, the "before" scores).
    run.terms += session.strategy.extra_terms(session.strategy_inputs(reporter))
    if ctx.is_main:
        for other in _superseded_states(ws, plan, key):
            what = ("an unreadable resumable state" if other["step"] is None else
                    f"resumable state of an interrupted run from {plan.parent} with other data or settings")
            reporter.log(f"{other['path']}: {what}; this run starts afresh and removes it when it writes its version")
    return session


def _load_parent(ws: Workspace, recipe: Recipe, plan: IncrementPlan, device: torch.device,
                 ctx: distributed.DistContext, reporter: Reporter) -> tuple[Any, Any, vocab.Growth | None]:
    """The parent's model and tokenizer, grown to the newest tokenizer revision of the new increments
    (``vocab.py``) -> (model, tokenizer, growth or None); every increment's ids checked against it."""
    model, tokenizer = models.load_version(ws, plan.parent, recipe=recipe, device=str(device), verify=ctx.is_main)
    revision = vocab.version_revision(ws, plan.parent, tokenizer)
    growth = vocab.training_growth(ws, revision, plan.new, plan.replay)
    if growth is not None:
        vocab.grow_embeddings(model, growth)
        tokenizer, revision = growth.tokenizer, growth.revision
        reporter.log(f"vocabulary: {growth.parent_size:,} -> {len(tokenizer):,} tokens (revision {revision.number}); "
                     "new rows start as the mean of their pieces' rows, the teacher keeps its vocabulary")
    for inc in dict.fromkeys([*plan.earlier, *plan.new]):
        check_tokenizer(inc, ws.increment_manifest(inc), revision.lineage, plan.parent,
                        "it cannot be trained into this line: ingest it into a workspace of its own")
    return model, tokenizer, growth


def _resume_or_score_parent(s: Session) -> TrainState:
    """A fresh run scores the parent (rank 0) and moves to ``plan.init_from``'s weights (joint); a
    resumed one loads the weights, optimizer, sampler, state and RNG of its last save instead."""
    run, plan, device = s.run, s.plan, s.run.device
    state = TrainState(first_bad_step=torch.tensor(-1, device=device))
    if s.store.current() is None:
        if s.ctx.is_main:
            state.eval_before = before_scores(s)
            if s.growth is None:  # the student still is the parent: its task scores cost no load
                _parent_task_scores(s, (run.model, s.tokenizer))
        if plan.init_from:
            models.load_weights_into(run.model, s.ws, plan.init_from, s.recipe, device)
    loaded = s.store.load(run.model, device)
    if loaded is not None:
        trainer, rng = loaded
        run.optimizer.load_state_dict(trainer["optimizer"])
        run.sampler.load_state_dict(trainer["sampler"])
        state = TrainState.from_dict(trainer["state"])
        restore_rng(rng, device)
        s.resumed_from = state.step
        s.reporter.log(f"resuming from step {state.step} of {plan.steps} ({s.store.current()})")
    return state


class _Clock:
    """Training seconds, read only where the device is synchronised anyway (log lines, saves), so
    they are true on CUDA too; saves are not counted as training time."""

    def __init__(self, state: TrainState):
        self.last, self.at_log = time.perf_counter(), state.train_seconds

    def count(self, state: TrainState) -> None:
        now = time.perf_counter()
        state.train_seconds += now - self.last
        self.last = now

    def since_log(self, state: TrainState) -> float:
        seconds, self.at_log = state.train_seconds - self.at_log, state.train_seconds
        return seconds

    def restart(self) -> None:
        self.last = time.perf_counter()


def _step_loop(s: Session, state: TrainState) -> None:
    """``train_step`` until the budget is spent, with log lines (to the tracker too), periodic saves,
    and on SIGINT/SIGTERM a save and Interrupted (every rank stops at the same step)."""
    run, plan, t = s.run, s.plan, s.recipe.train
    s.tracker.start(tracking.RunInfo(s.ws.next_version(), plan.parent, s.key, plan.new, recipe_to_dict(s.recipe)),
                    state.log)
    per_step_check = run.device.type == "cpu" or bool(os.environ.get("INCR_FAULT"))
    save_every, info = s.recipe.runtime.save_every, ""
    with StopSignal() as stop, s.reporter.progress(f"training {'+'.join(plan.new)}", total=plan.steps,
                                                    unit="steps") as bar:
        if state.step:
            bar.advance(state.step)
        clock = _Clock(state)
        while state.step < plan.steps:
            _one_step(s.ctx, run, state, per_step_check)
            at_log = state.step % t.log_every == 0 or state.step == plan.steps
            at_save = bool(save_every) and state.step % save_every == 0 and state.step < plan.steps
            stopping = _stop_agreed(s.ctx, stop, per_step_check or at_log or at_save, run.device)
            if at_log or at_save or stopping:
                _raise_if_bad(state)  # reads the device: the clock is honest
                clock.count(state)
            if at_log:
                line = log_line(run, state, clock.since_log(state))
                state.log.append(line)
                s.tracker.step(line)
                tps = line["tokens_per_second"]
                info = f"loss {line['total']:.4f}" + (f"  {tps:,.0f} tok/s" if tps else "")
            bar.advance(1, info)
            if at_save or stopping:
                _save(s, state)
                clock.restart()
            if stopping:
                signum = stop.signum or signal.SIGTERM
                raise Interrupted(f"interrupted by {signal.Signals(signum).name} after step {state.step} of "
                                  f"{plan.steps}; state saved in {s.store.root}: run the same command to resume",
                                  signum)


def _one_step(ctx: distributed.DistContext, run: Run, state: TrainState, check_loss: bool) -> None:
    try:
        with ctx.collective("a training step"):  # DDP's gradient sum: a rank that died shows here
            train_step(run, state, check_loss=check_loss)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrainingFailed(f"out of memory at step {state.step + 1} on {run.device}: lower train.batch_size "
                             "(raise train.grad_accum to keep the effective batch) or model.max_seq_len; "
                             f"{str(exc).splitlines()[0]}") from None
    fault_point("train.step")


def _stop_agreed(ctx: distributed.DistContext, stop: StopSignal, synchronised: bool, device: torch.device) -> bool:
    """Whether to stop now: on a signal; under DDP, ranks stop together or not at all, agreed only at
    steps where they synchronise anyway (``synchronised``)."""
    stopping = stop.signum is not None
    if ctx.enabled:
        stopping = synchronised and bool(ctx.all_reduce_sum(torch.tensor(float(stopping), device=device)).item())
    return stopping


def _save(s: Session, state: TrainState) -> None:
    """Resumable state: the student's weights, the optimizer, the sampler's position, the state, the RNG."""
    plan, run = s.plan, s.run
    meta = {"parent": plan.parent, "new": plan.new, "replay": plan.replay, "steps": plan.steps, "key": s.key}
    trainer = {"optimizer": run.optimizer.state_dict(), "sampler": run.sampler.state_dict(), "state": state.to_dict()}
    s.store.save(state.step, run.model, trainer, capture_rng(run.device), meta)


def _agree_on_the_end(s: Session, state: TrainState) -> dict[str, float | None]:
    """-> the losses averaged over the last steps (a collective: every rank takes part); under DDP,
    a check that every rank ended with the same weights."""
    _raise_if_bad(state)
    losses: dict[str, float | None] = {**dict.fromkeys(reported_loss_names()), **tail_losses(s.run, state)}
    if s.ctx.enabled:
        fingerprint = float(sum(p.detach().double().sum() for p in s.run.model.parameters()))
        if not s.ctx.all_equal(fingerprint):
            raise TrainingFailed("the ranks ended with different weights (a bug); nothing was promoted")
    return losses


def _log_full_head(run: Run, reporter: Reporter) -> None:
    if run.student_head.kind == "full":
        reporter.log(f"{type(run.model).__name__}: no masked-only head split for this class; the vocabulary "
                     "projection runs at every position (slower, equally correct)")


def _raise_if_bad(state: TrainState) -> None:
    bad = int(state.first_bad_step.item()) if state.first_bad_step is not None else -1
    if bad >= 0:
        raise TrainingFailed(f"non-finite loss at step {bad}; nothing was promoted: lower train.lr or check the "
                             "data of the new increments")


def _precision_choice(recipe: Recipe, place: Placement) -> dict[str, str]:
    return {"asked": recipe.runtime.precision, "chosen": place.precision, "why": place.why}


def _finish(s: Session, state: TrainState, losses: dict[str, float | None]) -> TrainResult:
    """Rank 0: score the student, gate, write the version, move LATEST when promoted."""
    ws, recipe, plan, run = s.ws, s.recipe, s.plan, s.run
    before = state.eval_before or {}
    gated = [d for d in plan.trained_on if d in before]  # the gate's sample
    merged = _merge_with_parent(s, gated)
    after = evaluate_lineage(run, s.shards, gated, recipe, s.tok_inputs)
    _require_scores(after, plan.pending)
    shared = _shared_scores(s, after)
    passed, checks, ppl_change = gate_checks(recipe, before, {**after, **shared}, plan.pending, plan.earlier)
    # on the gate's sample, like the scores: a cost that stays bounded as the lineage grows
    drift = embed.version_drift(run.model, lambda: _parent_as_grown(s), {d: s.shards[d] for d in after}, recipe,
                                place=s.place)
    drift = None if drift is None else {"parent": plan.parent, **drift}
    checks += embed.drift_checks(recipe, drift)
    tasks_before, tasks_after, task_seconds = _task_scores(s)
    checks += probe.task_gate_checks(recipe, s.tasks, tasks_before, tasks_after)
    passed = all(c["passed"] for c in checks)
    version = ws.next_version()
    metrics = {
        "version": version, "parent": plan.parent, "promoted": passed,
        "status": "promoted" if passed else "rejected",
        "gate": {"passed": passed, "checks": checks},
        "data": _data_record(plan, recipe),
        "steps": state.step, "tokens": state.tokens,
        "wall_seconds": round(time.perf_counter() - s.started, 3),
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds > 0 else None,
        "peak_memory_bytes": devices.peak_memory_bytes(run.device),
        "mfu_peak": {"flops_per_s": run.meter.peak_flops_per_s if run.meter else None,
                     "source": run.meter.peak_source if run.meter else "unknown"},
        "device": str(run.device), "precision": s.place.precision, "world_size": run.ctx.world_size,
        "precision_choice": _precision_choice(recipe, s.place),
        "trainable_parameters": s.trainable, "total_parameters": sum(p.numel() for p in run.model.parameters()),
        "loss": {k: finite_json(v) for k, v in losses.items()},
        "eval": {"before": _shown(before), "after": _shown(after), "after_shared_vocab": _shown(shared)},
        # forgetting: the relative change (after / before - 1); forgetting_ppl: the same in perplexity points
        "forgetting": ppl_change, "forgetting_ppl": ppl_deltas(before, {**after, **shared}, list(ppl_change)),
        "embedding_drift": drift, "vocab": _growth_record(s.growth),
        "merge": merged.to_dict() if merged else None,
        "tasks": probe.task_record(s.tasks, tasks_before, tasks_after, probe.probe_settings(recipe, s.place.precision)),
        "task_seconds": task_seconds,
        "gate_sample": _gate_sample(recipe, plan, s.shards, before, after),
        "resumed_from_step": s.resumed_from,
        "head": {"kind": run.student_head.kind, "masked_last_layer": run.student_head.masked_last_layer},
    }
    log = "".join(json.dumps(line) + "\n" for line in state.log)
    extra = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(), "train_log.jsonl": log.encode(),
             **s.strategy.version_files(s.strategy_inputs(Quiet())), **packaging_files(ws.version_dir(plan.parent))}
    run.model.eval()
    fault_point("train.version_write")
    sealed = models.save_version(ws, version, run.model, s.tokenizer, _version_manifest(s, state, metrics), extra)
    _written(s, version, sealed, after, tasks_after)
    if passed:
        fault_point("train.latest_update")
        ws.move_latest(version, command="train-increment", reason="passed the gate")
    return TrainResult(plan, version, passed, metrics, message=f"{version} {metrics['status']}",
                       resumed_from=s.resumed_from)


def _data_record(plan: IncrementPlan, recipe: Recipe) -> dict[str, Any]:
    """metrics.json's ``data``: replay = the earlier increments actually replayed (with the rows each could
    expect, ``replay.split``); earlier = all of the lineage (evaluated)."""
    replayed = plan.replay if plan.replay_per_batch else []
    return {"new": plan.pending, "replay": replayed, "earlier": plan.earlier, "retrained": plan.retrained,
            "new_sequences": plan.new_sequences, "replay_sequences": plan.replay_sequences if replayed else 0,
            "replay_split": recipe.replay.split if replayed else None,
            "replay_rows": plan.replay_rows if replayed else {}}


def _merge_with_parent(s: Session, increments: list[str]) -> merge.MergeRecord | None:
    """``merge``: average the student with the parent (``methods/merge.py``), the weight fixed or chosen on
    held-out rows of the gate's ``increments`` past the eval sample (None: no averaging asked)."""
    m = s.recipe.merge
    if m.weight == 1.0 and not m.choose:
        return None
    with torch.random.fork_rng(devices=[]):  # loading must not move the dropout stream
        parent_model, _ = models.load_version(s.ws, s.plan.parent, recipe=s.recipe, device=str(s.run.device),
                                              verify=False)
    parent = {name: p.detach() for name, p in parent_model.named_parameters()}
    rows, words, where = {}, {}, set()
    for inc in increments:
        heldout, skip = s.shards[inc].heldout, s.recipe.eval.max_sequences
        past = len(heldout) > skip
        part = slice(skip, skip + m.sequences) if past else slice(0, m.sequences)
        rows[inc] = heldout[part]
        words[inc] = None if s.shards[inc].heldout_words is None else s.shards[inc].heldout_words[part]
        where.add("held-out rows past the eval sample" if past else "the eval sample's rows (no others held out)")
    if m.choose and any(w.startswith("the eval") for w in where):
        s.reporter.warn("merge.choose: some increments hold no held-out rows past the first eval.max_sequences, so "
                        "the weight is chosen on the rows eval reports (optimistic); hold out more documents")
    pick = replace(s.recipe, eval=replace(s.recipe.eval, max_sequences=m.sequences))

    def losses_now() -> dict[str, float | None]:
        out = {}
        for inc, ids in rows.items():
            tokens = s.tok_inputs.of_vocab(s.shards[inc].manifest.get("vocab_size") or s.tok_inputs.vocab_size)
            out[inc] = score_sequences(s.run.student_head, HeldOut(f"{inc}/merge", ids, words[inc]), recipe=pick,
                                       tokens=tokens, place=s.place)["loss"]
        return out

    record = merge.merge_with_parent(s.run.model, parent, weight=m.weight, choose=m.choose, new=s.plan.pending,
                                     losses_now=losses_now)
    record.selected_on = "; ".join(sorted(where)) if record.chosen else ""
    del parent_model, parent
    s.reporter.log(f"merge: {record.weight:g} x trained + {1 - record.weight:g} x {s.plan.parent}"
                   + (f" (chosen of {', '.join(record.objective)} on held-out loss)" if record.chosen else ""))
    return record


def _written(s: Session, version: str, sealed: dict[str, Any], after: dict[str, Any], tasks_after: dict[str, Any]) -> None:
    """After the version is sealed: its scores into the books, the run's resumable states removed."""
    _record_after(s.ws, s.recipe, s.place.precision, version, sealed, after)
    book, sha = probe.TaskBook(s.ws, s.recipe, s.place), weights_checksum(sealed)
    for data in s.tasks:
        book.put(sha, version, data, tasks_after[data.name])
    s.store.clear()
    for other in _superseded_states(s.ws, s.plan, s.key):
        ResumeStore(s.ws, other["key"]).clear()


def _task_scores(s: Session) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """-> (the parent's task scores, the new version's, the seconds both took; None without tasks)."""
    started = time.perf_counter()
    before = _parent_task_scores(s)
    after = {}
    for data in s.tasks:
        s.reporter.log(probe.probing("the new version", data))
        after[data.name] = probe.score_task(s.run.model, s.tokenizer, data, s.recipe, place=s.place, reporter=s.reporter)
    return before, after, round(time.perf_counter() - started, 3) if s.tasks else None


def _parent_task_scores(s: Session, loaded: tuple[Any, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The parent's task scores: from the task book, else scored (with ``loaded``'s model and tokenizer
    when given: the student before training; else the parent loaded) and recorded there."""
    if not s.tasks:
        return {}
    return probe.score_version(probe.TaskBook(s.ws, s.recipe, s.place), s.plan.parent, s.tasks, reporter=s.reporter,
                               loaded=loaded)


def _parent_as_grown(s: Session) -> Any:
    """The parent's model as the new version reads text: grown to its vocabulary (new tokens through the
    rows they started from), for measuring drift on the same rows."""
    parent, _ = models.load_version(s.ws, s.plan.parent, recipe=s.recipe, device=str(s.run.device), verify=False)
    if s.growth is not None:
        vocab.grow_embeddings(parent, s.growth)
    return parent


def _shared_scores(s: Session, after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """After vocabulary growth: the new version's scores on the pending increments at the positions
    whose target the parent has too, so the gate compares both versions on the same positions."""
    if s.growth is None:
        return {}
    pending = [d for d in s.plan.pending if d in after]
    return evaluate_lineage(s.run, s.shards, pending, s.recipe, s.tok_inputs,
                            limits=vocab.VocabLimits(valid_below=s.growth.parent_size))


def _growth_record(growth: vocab.Growth | None) -> dict[str, Any] | None:
    """What the manifest and metrics say about the vocabulary a version grew (None: it did not grow)."""
    if growth is None:
        return None
    return {**growth.revision.to_dict(), "parent_size": growth.parent_size, "tokens_added": len(growth.added),
            "added": [{k: a[k] for k in ("token", "id", "frequency", "piece_ids")} for a in growth.added]}


def _tokenizer_record(s: Session) -> dict[str, Any]:
    """The version manifest's ``tokenizer``: its revision (sha256, lineage, number, size)."""
    if s.growth is not None:
        return s.growth.revision.to_dict()
    return vocab.version_revision(s.ws, s.plan.parent, s.tokenizer).to_dict()


def _version_manifest(s: Session, state: TrainState, metrics: dict[str, Any]) -> dict[str, Any]:
    """The new version's manifest (``models.save_version`` adds the files and their checksums)."""
    plan, recipe = s.plan, s.recipe
    parent_manifest = s.ws.version_manifest(plan.parent)
    return {"version": metrics["version"], "parent": plan.parent, "source": parent_manifest.get("source"),
            "head_initialised": parent_manifest.get("head_initialised", False),
            "trained_on": plan.trained_on, "new": plan.pending,
            "replay": metrics["data"]["replay"], "init_from": plan.init_from, "retrained": plan.retrained,
            "status": metrics["status"], "promoted": metrics["promoted"], "recipe": recipe_to_dict(recipe),
            "seeds": {"train": recipe.train.seed, "eval": recipe.eval.seed},
            "software": models.software_versions(), "device": str(s.run.device), "precision": s.place.precision,
            "precision_choice": metrics["precision_choice"],
            "world_size": s.run.ctx.world_size, "steps": state.step, "run_key": s.key,
            "tokenizer": _tokenizer_record(s), "vocab_growth": metrics["vocab"]}


__all__ = ["TrainResult", "train_increment", "evaluate_lineage", "gate_checks"]
