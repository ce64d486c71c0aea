"""Configurations (b) and (c): incr's own training step on the same packed rows.

The run is assembled exactly as ``incr_cli.line.increment._train`` assembles it (``build_run`` with the
recipe, the tokenizer's special ids, a one-process ``DistContext``) and stepped with the real
``train_step``, with the same per-step loss check the CLI uses on that device. What is skipped is
what happens around the loop: loading a version from disk, the before/after evaluation, and
writing the new version. (b) is plain MLM (distill.alpha=0, replay.ratio=0); (c) is the default
increment (teacher distillation alpha 0.5, replay ratio 0.25 drawn from an earlier increment).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def incr_overrides(spec: dict[str, Any], total_steps: int) -> list[str]:
    """Recipe overrides of a benchmark configuration (everything else is incr's default recipe)."""
    alpha, ratio = (0.0, 0.0) if spec["config"] == "b" else (0.5, 0.25)
    out = [f"train.batch_size={spec['batch']}", f"train.steps={total_steps}", f"distill.alpha={alpha}",
           f"replay.ratio={ratio}", f"runtime.precision={spec['precision']}",
           f"runtime.num_threads={spec['threads']}", f"model.max_seq_len={spec['seq_len']}",
           f"runtime.compile={str(bool(spec.get('compile'))).lower()}", f"train.seed={spec['seed']}"]
    return out


def run_incr(spec: dict[str, Any], device: torch.device, driver: Any) -> None:
    from _worker import build_model, load_tokenizer

    from incr_cli.config.recipe import build_recipe
    from incr_cli.data.shards import IncrementShards, split_batch_size
    from incr_cli.methods import loss_terms
    from incr_cli.progress import Quiet
    from incr_cli.runtime import device as devices
    from incr_cli.runtime import distributed
    from incr_cli.training.masking import tokenizer_inputs
    from incr_cli.training.plan import IncrementPlan
    from incr_cli.training.step import RunSpec, TrainState, build_run, train_step

    recipe = build_recipe({}, "bench", incr_overrides(spec, driver.total_steps))
    tokenizer = load_tokenizer(spec)
    model = build_model(spec).to(device)
    seq_len = spec["seq_len"]

    def shards(increment_id: str, path: str) -> IncrementShards:
        rows = np.load(path, mmap_mode="r")
        empty = np.zeros((0, seq_len), dtype=rows.dtype)
        return IncrementShards(increment_id, rows, empty, {"seq_len": seq_len}, spec["pad_id"])

    new = shards("d0002-new", spec["new_rows"])
    replay = shards("d0001-earlier", spec["replay_rows"])
    n_new, n_replay = split_batch_size(recipe.train.batch_size, recipe.replay.ratio, True)
    plan = IncrementPlan("v0001", [new.id], [replay.id] if n_replay else [], len(new.train), len(replay.train),
                         n_new, n_replay, 1, driver.total_steps, driver.total_steps * recipe.train.batch_size * seq_len,
                         seq_len)
    ctx = distributed.DistContext(0, 1, device)
    place = devices.Placement.resolve(device, recipe.runtime.precision)
    precision = place.precision
    devices.configure_threads(recipe.runtime.num_threads)
    torch.manual_seed(recipe.train.seed * 7919)
    run_spec = RunSpec(recipe, plan, [new], [replay] if n_replay else [], tokenizer_inputs(tokenizer, recipe),
                       loss_terms(recipe, plan))
    run, trainable = build_run(model, run_spec, place=place, ctx=ctx, reporter=Quiet())
    state = TrainState(first_bad_step=torch.tensor(-1, device=device))
    check_loss = device.type == "cpu"  # as the CLI's loop does
    driver.start(n_new=n_new, n_replay=n_replay, teacher=run.teacher is not None, trainable=trainable,
                 terms=run.term_names, precision=precision,
                 masked_last_layer=bool(getattr(run.student_head, "masked_last_layer", False)))
    while state.step < driver.total_steps:
        driver.step_begin()
        train_step(run, state, check_loss=check_loss)
        driver.step_end()
