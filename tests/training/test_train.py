"""train-increment: the plan, the loop's loss against plain MLM, freezing, gate, NaN guard, end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.config.recipe import build_recipe, load_recipe
from incr_cli.data.shards import BatchSampler, Draw, open_increment
from incr_cli.line.increment import gate_checks
from incr_cli.methods import loss_terms, plan_increment
from incr_cli.progress import Quiet
from incr_cli.runtime.device import Placement
from incr_cli.runtime.distributed import DistContext
from incr_cli.store.workspace import Workspace
from incr_cli.training import step as step_mod
from incr_cli.training.masking import TokenIds, mask_batch
from incr_cli.training.plan import IncrementPlan
from incr_cli.training.step import RunSpec, TrainState, build_run, train_step
from tests.helpers_train import (
    reset_faults,
    tagged_rows,
    tiny_model,
    weights,
    write_increment,
)

runner = CliRunner()
METRIC_KEYS = {"version", "parent", "promoted", "gate", "data", "steps", "tokens", "wall_seconds",
               "tokens_per_second", "peak_memory_bytes", "device", "precision", "trainable_parameters", "loss",
               "eval", "forgetting"}


def cli(*args: object):
    reset_faults()
    return runner.invoke(app, ["train-increment", *map(str, args)])


# ----------------------------------------------------------------------------- the loop against references

T = 16
SPECIALS = torch.tensor([0, 1, 2, 3, 4])  # [PAD] [UNK] [CLS] [SEP] [MASK] of the tiny vocabulary


def loop_run(tmp_path, recipe_data: dict, *, replay: bool = False, steps: int = 3):
    """A Run over hand-written increments (no workspace model), with every mask recorded."""
    ws = Workspace(tmp_path / "data-ws")
    ws.root.mkdir()
    new = open_increment(ws, write_increment(ws, "new", tagged_rows(11, 40, T), tagged_rows(12, 2, T)))
    old = [open_increment(ws, write_increment(ws, "old", tagged_rows(21, 40, T), tagged_rows(22, 2, T)))] if replay else []
    recipe = build_recipe(recipe_data)
    n_replay = round(recipe.train.batch_size * recipe.replay.ratio) if replay else 0
    plan = IncrementPlan("v0000", [new.id], [o.id for o in old], 40, 40 if replay else 0,
                         recipe.train.batch_size - n_replay, n_replay, 1, steps, 0, T)
    model = tiny_model()
    reference = copy.deepcopy(model)
    tok_inputs = TokenIds(SPECIALS, mask_token_id=4, vocab_size=3000, pad_id=0)
    cpu = torch.device("cpu")
    spec = RunSpec(recipe, plan, [new], old, tok_inputs, loss_terms(recipe, plan))
    run, trainable = build_run(model, spec, place=Placement(cpu), ctx=DistContext(0, 1, cpu), reporter=Quiet())
    return run, reference, trainable


@pytest.fixture
def recorded_masks(monkeypatch):
    masks = []
    real = step_mod.mask_batch

    def recording(ids, *args, **kwargs):
        out = real(ids, *args, **kwargs)
        masks.append((ids.clone(), out))
        return out

    monkeypatch.setattr(step_mod, "mask_batch", recording)
    return masks


PLAIN = {"train": {"batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant",
                   "max_grad_norm": 1.0},
         "distill": {"alpha": 0.0}, "replay": {"ratio": 0.0}, "masking": {"probability": 0.3}}


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_plain_setting_is_exactly_plain_mlm_fine_tuning(tmp_path, recorded_masks, grad_accum):
    """alpha=0, ratio=0: the loop's loss and update equal a hand-written HF MLM step (full head,
    labels=-100 elsewhere, mean over the window's masked tokens, clipping, AdamW); the log line's
    grad_norm is the reference's norm before clipping (clipping off with grad_accum 3)."""
    recipe = copy.deepcopy(PLAIN)
    recipe["train"]["grad_accum"] = grad_accum
    max_norm = 1.0 if grad_accum == 1 else 0.0
    recipe["train"]["max_grad_norm"] = max_norm
    run, reference, _ = loop_run(tmp_path, recipe)
    norms = []
    assert [t.name for t in run.terms] == ["mlm_new"] and run.teacher is None
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    reference.train()
    state = TrainState(first_bad_step=torch.tensor(-1))
    for _ in range(2):
        start = len(recorded_masks)
        loss = train_step(run, state, check_loss=True)
        window = recorded_masks[start:]
        n_targets = sum(int(m.positions.sum()) for _, m in window)
        ref_loss = 0.0
        for ids, masked in window:
            labels = torch.where(masked.positions, ids, -100)
            logits = reference(input_ids=masked.input_ids, attention_mask=ids != 0).logits  # (B, T, V)
            part = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / n_targets
            part.backward()
            ref_loss += part.item()
        if grad_accum == 1:  # the textbook form: transformers' own mean loss
            ids, masked = window[0]
            hf = reference(input_ids=masked.input_ids, attention_mask=ids != 0,
                           labels=torch.where(masked.positions, ids, -100)).loss
            assert loss == pytest.approx(hf.item(), rel=1e-5)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm or float("inf")).item())
        optimizer.step()
        optimizer.zero_grad()
    for (name, p), q in zip(run.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert step_mod.log_line(run, state, 1.0)["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-4)


def test_replay_and_distill_terms_follow_the_formula(tmp_path, recorded_masks):
    """L = mlm(new)/n_new + w * mlm(replay)/n_replay + alpha * kd/n_masked; kd = 0 while student = teacher."""
    recipe = {"train": {"batch_size": 4, "lr": 1e-3}, "distill": {"alpha": 0.7, "hidden_weight": 0.3},
              "replay": {"ratio": 0.5, "weight": 2.0}}
    run, reference, _ = loop_run(tmp_path, recipe, replay=True)
    assert [t.name for t in run.terms] == ["mlm_new", "mlm_replay", "distill", "hidden"]
    state = TrainState(first_bad_step=torch.tensor(-1))
    loss = train_step(run, state, check_loss=True)
    (ids, masked), = recorded_masks
    assert masked.positions.shape == (4, T)
    logits = reference(input_ids=masked.input_ids, attention_mask=ids != 0).logits
    labels = torch.where(masked.positions, ids, -100)
    new = F.cross_entropy(logits[:2].flatten(0, 1), labels[:2].flatten(), ignore_index=-100)
    old = F.cross_entropy(logits[2:].flatten(0, 1), labels[2:].flatten(), ignore_index=-100)
    assert state.window["distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert state.window["hidden"].item() == pytest.approx(0.0, abs=1e-6)
    assert state.window["mlm_new"].item() == pytest.approx(new.item(), rel=1e-5)
    assert state.window["mlm_replay"].item() == pytest.approx(old.item(), rel=1e-5)
    assert loss == pytest.approx(new.item() + 2.0 * old.item(), rel=1e-5)
    train_step(run, state, check_loss=True)  # now the student has moved: the teacher disagrees
    assert state.window["distill"].item() > 0


def test_gate_checks_relative_perplexity():
    recipe = build_recipe({"gate": {"max_forgetting": 0.1, "min_improvement": 0.05}})
    before = {"a": {"perplexity": 10.0}, "b": {"perplexity": 20.0}}
    passed, checks, forgetting = gate_checks(recipe, before, {"a": {"perplexity": 10.5}, "b": {"perplexity": 18.0}},
                                             ["b"], ["a"])
    assert passed and forgetting == {"a": pytest.approx(0.05)}
    assert [(c["check"], c["increment"], c["passed"]) for c in checks] == [
        ("max_forgetting", "a", True), ("min_improvement", "b", True)]
    passed, checks, _ = gate_checks(recipe, before, {"a": {"perplexity": 12.0}, "b": {"perplexity": 19.5}},
                                    ["b"], ["a"])
    assert not passed and [c["passed"] for c in checks] == [False, False]
    assert gate_checks(build_recipe({}), before, before, ["b"], ["a"])[:2] == (True, [])


# ----------------------------------------------------------------------------- plan


def test_plan_budget_from_epochs_tokens_and_sample(two_increments):
    ws = two_increments
    seqs = ws.increment_manifest("d0002-fortunes")["sequences"]["train"]
    plan = plan_increment(ws, load_recipe(ws.recipe_path, ["train.steps=null", "train.epochs=2",
                                                           "train.grad_accum=2"]))
    assert (plan.parent, plan.new, plan.replay) == ("v0001", ["d0002-fortunes"], ["d0001-austen"])
    assert (plan.new_per_batch, plan.replay_per_batch) == (8, 3)  # batch 8 + round(8 * 0.25 / 0.75) replayed on top
    assert plan.steps == int(np.ceil(2 * seqs / (8 * 2)))
    capped = plan_increment(ws, load_recipe(ws.recipe_path, ["train.steps=null", f"train.max_tokens={3 * 11 * 64}"]))
    assert capped.steps == 3 and capped.tokens == 3 * 11 * 64
    sampled = plan_increment(ws, load_recipe(ws.recipe_path, ["train.steps=null", "data.sample=12"]))
    assert sampled.new_sequences == 12 and sampled.steps == 2
    first = plan_increment(ws, load_recipe(ws.recipe_path), "v0000")  # an older parent: both are new
    assert first.new == ["d0001-austen", "d0002-fortunes"] and first.replay_per_batch == 0
    share = plan_increment(ws, load_recipe(ws.recipe_path, ["train.steps=null", "replay.on_top=false"]))
    assert (share.new_per_batch, share.replay_per_batch) == (6, 2)  # a quarter of the batch of 8 replayed
    assert share.steps == int(np.ceil(seqs / 6)) and share.tokens == share.steps * 8 * 64


def test_replay_on_top_trains_on_a_plain_fine_tunes_new_rows(two_increments):
    """replay.on_top (the default) adds the replayed rows to the batch: the new rows of every step are
    the plain fine-tune's (same seed), where on_top=false gives a quarter of them to replay."""
    ws = two_increments

    def sampler(*overrides: str) -> BatchSampler:
        plan = plan_increment(ws, load_recipe(ws.recipe_path, list(overrides)))
        replay = [open_increment(ws, d) for d in plan.replay] if plan.replay_per_batch else []
        return BatchSampler([open_increment(ws, d) for d in plan.new], replay,
                            Draw(plan.new_per_batch, plan.replay_per_batch, seed=0))

    naive, share, on_top = sampler("strategy.name=naive"), sampler("replay.on_top=false"), sampler()
    for _ in range(6):
        plain, shared, added = naive.next_batch(), share.next_batch(), on_top.next_batch()
        np.testing.assert_array_equal(added.new_ids, plain.new_ids)
        assert added.replay_ids.shape[0] == 3 and shared.new_ids.shape[0] == 6 and shared.replay_ids.shape[0] == 2


def test_nothing_to_train_exits_0_and_writes_nothing(one_pending):
    ws = one_pending
    assert cli(ws.root, "train.steps=2").exit_code == 0
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*") if ".incr.lock" not in p.name)
    result = cli(ws.root)
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.output
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*") if ".incr.lock" not in p.name) == before
    result = cli(ws.root, "--json")
    assert json.loads(result.stdout)["nothing_to_train"] is True


def test_dry_run_prints_the_plan_and_trains_nothing(one_pending):
    result = cli(one_pending.root, "--dry-run", "train.steps=7")
    assert result.exit_code == 0, result.output
    for text in ("v0000", "d0001-austen", "steps", "7", "distill:", "alpha: 0.5"):
        assert text in result.output
    assert one_pending.versions() == ["v0000"] and not (one_pending.staging / "resume").exists()
    doc = json.loads(cli(one_pending.root, "--dry-run", "--json").stdout)
    assert doc["plan"]["new"] == ["d0001-austen"] and doc["recipe"]["train"]["steps"] == 20


def test_bad_input_exits_2(one_pending):
    result = cli(one_pending.root, "train.freeze=['(unclosed']", "train.steps=1")
    assert result.exit_code == 2 and "train.freeze" in result.output
    assert cli(one_pending.root, "--parent", "v0042").exit_code == 2
    assert cli(one_pending.root, "train.stepz=3").exit_code == 2
    result = cli(one_pending.root, "train.freeze_lower_layers=9", "train.steps=1")
    assert result.exit_code == 2 and "only 2 layers" in result.output
    assert one_pending.versions() == ["v0000"]


def test_locked_workspace_exits_75(one_pending):
    with one_pending.lock("ingest"):
        result = cli(one_pending.root, "train.steps=1")
    assert result.exit_code == 75 and "locked" in result.output


# ----------------------------------------------------------------------------- masking, freezing, gate, NaN


def test_whole_word_and_fixed_count_masking_train(one_pending, monkeypatch):
    """The training masks honour both keys: never more than 6 tokens a row (but for a lone word longer
    than that), and whole words: every piece of a word masked with it, including multi-piece words."""
    seen = []

    def spy(ids, cfg, tokens, **kw):
        out = mask_batch(ids, cfg, tokens, **kw)
        seen.append((ids, out.positions, tokens.word_starts))
        return out

    monkeypatch.setattr(step_mod, "mask_batch", spy)
    result = cli(one_pending.root, "--json", "train.steps=2", "masking.whole_word=true", "masking.per_sequence=6",
                 "eval.max_sequences=4")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["promoted"] and metrics["loss"]["mlm_new"] > 0
    assert len(seen) == 2  # one micro-batch per step
    pieces_masked = 0
    for ids, positions, word_starts in seen:
        continues = ~word_starts[ids]  # (B, T) a piece continuing the word before it (special ids start)
        counts = positions.sum(1)
        assert ((1 <= counts) & (counts <= 6)).all() or _one_long_word(positions, continues), counts
        # whole words: a masked piece's neighbours within its word are masked too
        assert torch.equal(positions[:, 1:] & continues[:, 1:], positions[:, :-1] & continues[:, 1:])
        pieces_masked += int((positions & continues).sum())
    assert pieces_masked > 0, "no multi-piece word was masked: the whole-word path was not exercised"


def _one_long_word(positions, continues) -> bool:
    """Rows over the cap hold a single masked word (taken only because no word fits)."""
    over = positions.sum(1) > 6
    starts = positions & ~continues
    return bool((starts[over].sum(1) == 1).all())


def test_frozen_parameters_are_unchanged_and_counted(one_pending):
    ws = one_pending
    result = cli(ws.root, "--json", "train.steps=3", "train.freeze_lower_layers=1",
                 "train.freeze=['cls\\.predictions\\.transform\\.']")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    parent, child = weights(ws, "v0000"), weights(ws, "v0001")
    frozen = [n for n in parent if n.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "cls.predictions.transform."))]
    trained = [n for n in parent if n not in frozen and n.endswith("weight")]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(parent[name], child[name]), name
    for name in trained:
        assert not torch.equal(parent[name], child[name]), name
    from incr_cli.model.weights import load_version

    model, _ = load_version(ws, "v0000")
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if not n.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "cls.predictions.transform.")))
    assert metrics["trainable_parameters"] == expected < metrics["total_parameters"]


def test_gate_rejection_writes_a_rejected_version_and_keeps_latest(one_pending):
    ws = one_pending
    result = cli(ws.root, "train.steps=2", "gate.min_improvement=0.99")
    assert result.exit_code == 3, result.output
    assert "failed the gate" in result.output and "min_improvement" in result.output
    assert ws.latest() == "v0000" and ws.versions() == ["v0000", "v0001"]
    manifest = ws.verify_version("v0001")
    assert manifest["status"] == "rejected" and manifest["promoted"] is False
    metrics = json.loads((ws.version_dir("v0001") / "metrics.json").read_text())
    assert metrics["promoted"] is False and metrics["gate"]["passed"] is False
    # the gate line speaks the table's language: the perplexity change with the table's sign, and the
    # bound as a change too (a fall of 99% or more)
    after, before = (metrics["eval"][k]["d0001-austen"]["perplexity"] for k in ("after", "before"))
    change = f"{after / before - 1:+.1%}"
    assert f"held-out perplexity {change}, must be -99.0% or lower: FAILED" in result.output, result.output
    assert result.stdout.count(change) == 2  # the same figure in the table's change column and the gate log line
    again = cli(ws.root, "train.steps=2", "gate.min_improvement=0.99", "--json")  # cron reruns: no new version
    assert again.exit_code == 3 and "already trained" in again.output
    assert ws.versions() == ["v0000", "v0001"] and json.loads(again.stdout)["version"] == "v0001"


def test_non_finite_loss_stops_the_run_naming_the_step(one_pending, monkeypatch):
    ws = one_pending
    monkeypatch.setenv("INCR_FAULT", "train.loss@3:nan")
    result = cli(ws.root, "train.steps=5")
    assert result.exit_code == 1, result.output
    assert "non-finite loss" in result.output and "step 3" in result.output
    assert ws.versions() == ["v0000"] and ws.latest() == "v0000"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_increments_end_to_end(tiny_workspace, tmp_path):
    """init -> ingest A -> train v0001 -> ingest B -> train v0002 with distillation and replay."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from tests.helpers_train import excerpt

    ws = tiny_workspace
    ingest = lambda path: runner.invoke(app, ["ingest", str(ws.root), str(path)])  # noqa: E731
    assert ingest(excerpt("austen.txt", slice(0, 300), tmp_path)).exit_code == 0
    first = cli(ws.root, "train.steps=4")
    assert first.exit_code == 0, first.output
    assert ws.latest() == "v0001" and "v0001 promoted" in first.output
    assert ingest(excerpt("pydocs.txt", slice(0, 600), tmp_path)).exit_code == 0
    second = cli(ws.root, "--json", "train.steps=6", "train.log_every=2", "gate.max_forgetting=5.0")
    assert second.exit_code == 0, second.output
    metrics = json.loads(second.stdout)
    assert ws.latest() == "v0002"

    assert METRIC_KEYS <= metrics.keys()
    assert metrics["version"] == "v0002" and metrics["parent"] == "v0001" and metrics["promoted"] is True
    assert metrics["data"]["new"] == [ws.increments()[1]] and metrics["data"]["replay"] == [ws.increments()[0]]
    assert set(metrics["loss"]) >= {"mlm_new", "mlm_replay", "distill", "total"}
    assert all(metrics["loss"][k] > 0 for k in ("mlm_new", "mlm_replay", "distill", "total"))
    assert set(metrics["eval"]["before"]) == set(metrics["eval"]["after"]) == set(ws.increments())
    assert set(metrics["eval"]["after"][ws.increments()[0]]) == {"loss", "perplexity", "accuracy", "coverage"}
    assert list(metrics["forgetting"]) == [ws.increments()[0]]
    old, (b, a) = ws.increments()[0], (metrics["eval"][k][ws.increments()[0]]["perplexity"] for k in ("before", "after"))
    assert metrics["forgetting"][old] == pytest.approx(a / b - 1)  # relative, as the gate limits it
    assert metrics["forgetting_ppl"][old] == pytest.approx(a - b, abs=1e-4)  # and in perplexity points
    assert metrics["gate"]["passed"] and metrics["gate"]["checks"][0]["check"] == "max_forgetting"
    assert metrics["steps"] == 6 and metrics["tokens"] > 0 and metrics["tokens_per_second"] > 0

    folder = ws.version_dir("v0002")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json", "metrics.json",
                 "train_log.jsonl"):
        assert (folder / name).is_file(), name
    manifest = ws.verify_version("v0002")
    assert manifest["parent"] == "v0001" and manifest["status"] == "promoted"
    assert manifest["trained_on"] == ws.increments() and manifest["replay"] == [ws.increments()[0]]
    for key in ("recipe", "seeds", "software", "device", "files"):
        assert manifest[key], key
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [2, 4, 6]
    assert {"mlm_new", "mlm_replay", "distill", "total", "lr", "tokens_per_second"} <= log[0].keys()
    assert not (ws.staging / "resume").exists() or not any((ws.staging / "resume").iterdir())

    model = AutoModelForMaskedLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    assert len(fill(f"she said {tokenizer.mask_token} to him.")) == 5


def test_naive_strategy_trains_without_teacher_or_replay_but_still_measures_forgetting(two_increments):
    result = cli(two_increments.root, "--json", "strategy.name=naive", "train.steps=2", "eval.max_sequences=8")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["data"]["replay"] == [] and metrics["data"]["earlier"] == ["d0001-austen"]
    assert metrics["loss"]["mlm_replay"] is None and metrics["loss"]["distill"] is None
    assert metrics["loss"]["total"] == pytest.approx(metrics["loss"]["mlm_new"])
    assert list(metrics["forgetting"]) == ["d0001-austen"]
    assert two_increments.version_manifest("v0002")["replay"] == []


def test_ewc_strategy_adds_its_penalty_and_stores_the_fisher(two_increments):
    ws = two_increments
    result = cli(ws.root, "--json", "strategy.name=ewc", "train.steps=3", "ewc.fisher_batches=2",
                 "eval.max_sequences=8", "train.log_every=1")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["loss"]["ewc"] is not None and metrics["loss"]["distill"] is None
    log = [json.loads(line) for line in (ws.version_dir("v0002") / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["ewc"] == pytest.approx(0.0, abs=1e-12) and log[-1]["ewc"] > 0  # zero at the anchor only
    manifest = ws.verify_version("v0002")
    assert "fisher.safetensors" in manifest["files"]
    from incr_cli.methods.ewc import load_fisher

    fisher = load_fisher(ws, "v0002")
    assert "bert.encoder.layer.0.attention.self.query.weight" in fisher
    assert all(bool((f >= 0).all()) for f in fisher.values()) and any(bool((f > 0).any()) for f in fisher.values())


def test_joint_strategy_retrains_from_the_root_on_every_increment(two_increments):
    ws = two_increments
    dry = cli(ws.root, "--dry-run", "--json", "strategy.name=joint")
    plan = json.loads(dry.stdout)["plan"]
    assert plan["new"] == ["d0001-austen", "d0002-fortunes"] and plan["replay"] == []
    assert plan["init_from"] == "v0000" and plan["retrained"] == ["d0001-austen"]
    result = cli(ws.root, "--json", "strategy.name=joint", "train.steps=2", "eval.max_sequences=8")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["data"]["new"] == ["d0002-fortunes"] and metrics["data"]["retrained"] == ["d0001-austen"]
    assert list(metrics["forgetting"]) == ["d0001-austen"]
    manifest = ws.version_manifest("v0002")
    assert manifest["parent"] == "v0001" and manifest["init_from"] == "v0000"
    assert manifest["trained_on"] == ["d0001-austen", "d0002-fortunes"] and manifest["new"] == ["d0002-fortunes"]
