"""Strategies: presets, the EWC term inside the loop, the Fisher estimate and file, ewc and joint increments."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load
from typer.testing import CliRunner

import incr_cli.methods as methods
from incr_cli.cli.app import app
from incr_cli.config.recipe import build_recipe, load_recipe, strategy_presets
from incr_cli.data.shards import BatchSampler, Draw, open_increment
from incr_cli.line.increment import train_increment
from incr_cli.methods import ewc, loss_terms
from incr_cli.model.weights import load_version
from incr_cli.progress import Quiet
from incr_cli.runtime.device import Placement
from incr_cli.runtime.distributed import DistContext
from incr_cli.store.workspace import Workspace
from incr_cli.training.masking import TokenIds, mask_batch, stable_seed, tokenizer_inputs
from incr_cli.training.plan import IncrementPlan
from incr_cli.training.step import RunSpec, TrainState, build_run, train_step
from incr_cli.training.terms import LogitDistill, MicroOutputs, Normalisers, teacher_rows
from tests.helpers_train import (
    _ingest,
    assert_same_weights,
    excerpt,
    reset_faults,
    tagged_rows,
    tiny_model,
    weights,
    write_increment,
)

runner = CliRunner()
T = 16
CPU = torch.device("cpu")
TOK_INPUTS = TokenIds(torch.tensor([0, 1, 2, 3, 4]), mask_token_id=4, vocab_size=3000, pad_id=0)
ALL = ["naive", "replay", "distill", "replay+distill", "ewc", "joint"]
PRESETS = strategy_presets()


def hand_increment(tmp_path, tag: int = 11, rows: int = 40):
    ws = Workspace(tmp_path / "data-ws")
    ws.root.mkdir(parents=True, exist_ok=True)
    return open_increment(ws, write_increment(ws, f"inc{tag}", tagged_rows(tag, rows, T), tagged_rows(tag + 1, 2, T)))


# ----------------------------------------------------------------------------- presets


def test_each_strategy_is_one_registered_class_whose_preset_names_real_keys():
    """A strategy is found by its name alone, and what it declares is what the recipe and metrics use."""
    from incr_cli.config.recipe import iter_keys

    keys = {k.path for k in iter_keys()}
    assert list(methods.STRATEGIES) == ALL
    for name, s in methods.STRATEGIES.items():
        assert s.name == name and methods.get_strategy(name) is s
        assert set(s.preset) <= keys, f"{name}: preset names unknown keys {set(s.preset) - keys}"
        assert set(s.extra_loss_names) <= set(methods.reported_loss_names())
    assert methods.reported_loss_names() == ("mlm_new", "mlm_replay", "distill", "hidden", "ewc")


@pytest.mark.parametrize("name", ALL)
def test_each_preset_resolves_to_its_settings(name):
    """A file's own alpha/ratio survive only where the preset does not fix them."""
    recipe = build_recipe({"distill": {"alpha": 0.7, "hidden_weight": 0.2}, "replay": {"ratio": 0.3}},
                          overrides=[f"strategy.name={name}"])
    distills = name in ("distill", "replay+distill")
    replays = name in ("replay", "replay+distill")
    assert recipe.strategy.name == name
    assert recipe.distill.alpha == (0.7 if distills else 0.0)
    assert recipe.distill.hidden_weight == (0.2 if distills else 0.0)
    assert recipe.replay.ratio == (0.3 if replays else 0.0)
    assert set(PRESETS) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_recipe_show_names_what_the_preset_sets(name):
    result = runner.invoke(app, ["recipe", "show", f"strategy.name={name}", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["recipe"]["strategy"]["name"] == name
    assert doc["preset"] == PRESETS[name]
    for key, value in PRESETS[name].items():
        section, _, field = key.partition(".")
        assert doc["recipe"][section][field] == value


# ----------------------------------------------------------------------------- the EWC term in the loop


SGD = {"train": {"batch_size": 4, "grad_accum": 2, "lr": 0.1, "weight_decay": 0.0, "warmup_ratio": 0.0,
                 "schedule": "constant", "max_grad_norm": 0.0},
       "masking": {"probability": 0.3}, "strategy": {"name": "ewc"}, "ewc": {"weight": 50.0}}


def sgd_step(tmp_path, *, with_ewc: bool, displacement: float):
    """One loop step (2 micro-batches, plain SGD so the update is -lr * grad) from theta* + displacement.

    -> (anchor, theta before, theta after, fisher, state)."""
    recipe = build_recipe(SGD)
    new = hand_increment(tmp_path)
    plan = IncrementPlan("v0000", [new.id], [], 40, 0, 4, 0, 1, 3, 0, T)
    model = tiny_model()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(displacement * torch.randn(p.shape, generator=gen))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    spec = RunSpec(recipe, plan, [new], [], TOK_INPUTS, loss_terms(recipe, plan))
    run, _ = build_run(model, spec, place=Placement(CPU), ctx=DistContext(0, 1, CPU), reporter=Quiet())
    run.optimizer = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=0.1)
    if with_ewc:
        run.terms.append(ewc.EwcPenalty(recipe.ewc.weight, anchor, fisher))
    state = TrainState(first_bad_step=torch.tensor(-1))
    train_step(run, state, check_loss=True)
    after = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return anchor, before, after, fisher, state


def test_ewc_term_is_zero_at_the_anchor(tmp_path):
    _, _, plain, _, _ = sgd_step(tmp_path / "a", with_ewc=False, displacement=0.0)
    _, _, with_ewc, _, state = sgd_step(tmp_path / "b", with_ewc=True, displacement=0.0)
    assert float(state.window["ewc"]) == 0.0
    for name in plain:
        assert torch.equal(plain[name], with_ewc[name]), name


def test_ewc_gradient_in_the_loop_matches_the_hand_computed_one(tmp_path):
    """d/dtheta of weight/2 * sum F (theta - theta*)^2 = weight * F * (theta - theta*), over a
    2-micro-batch window: the SGD updates with and without the term differ by lr times that."""
    anchor, before, plain, fisher, _ = sgd_step(tmp_path / "a", with_ewc=False, displacement=0.01)
    _, before_b, with_ewc, _, state = sgd_step(tmp_path / "b", with_ewc=True, displacement=0.01)
    weight, lr = SGD["ewc"]["weight"], SGD["train"]["lr"]
    penalty = sum(0.5 * (fisher[n] * (before[n] - anchor[n]) ** 2).sum() for n in anchor)
    assert float(state.window["ewc"]) == pytest.approx(float(penalty), rel=1e-5)
    assert float(state.window["total"]) == pytest.approx(float(state.window["mlm_new"]) + weight * float(penalty),
                                                         rel=1e-5)
    for name in anchor:
        assert torch.equal(before[name], before_b[name])
        expected = -lr * weight * fisher[name] * (before[name] - anchor[name])
        torch.testing.assert_close(with_ewc[name] - plain[name], expected, rtol=1e-3, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- the Fisher


def test_fisher_is_the_squared_gradient_of_the_mlm_loss(tmp_path):
    """One batch: F = (d mean-MLM-loss / d theta)^2, computed here with transformers' own full head and loss."""
    recipe = build_recipe({"train": {"batch_size": 6, "seed": 3}, "masking": {"probability": 0.3}})
    shards = hand_increment(tmp_path)
    model = tiny_model()
    model.train()
    frozen = "bert.embeddings.position_embeddings.weight"
    model.get_parameter(frozen).requires_grad_(False)
    fisher = ewc.fisher_diagonal(model, [shards], recipe, TOK_INPUTS, place=Placement(CPU), batches=1)

    assert model.training and not model.get_parameter(frozen).requires_grad  # flags restored
    assert all(p.grad is None for p in model.parameters())
    assert fisher.keys() == dict(model.named_parameters()).keys()  # frozen ones too
    sampler = BatchSampler([shards], [], Draw(6, seed=3))
    ids = torch.from_numpy(sampler.next_batch().input_ids)
    gen = torch.Generator().manual_seed(stable_seed("ewc-fisher", 3, 0))
    masked = mask_batch(ids, recipe.masking, TOK_INPUTS, generator=gen)
    reference = tiny_model().eval()
    loss = reference(input_ids=masked.input_ids, attention_mask=ids != 0,
                     labels=torch.where(masked.positions, ids, -100)).loss
    names, params = zip(*reference.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for name, grad in zip(names, grads):
        expected = torch.zeros_like(fisher[name]) if grad is None else grad.pow(2)
        torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-12, msg=name)


def test_fisher_is_a_seeded_mean_over_batches(tmp_path):
    recipe = build_recipe({"train": {"batch_size": 4}, "ewc": {"fisher_batches": 3}})
    shards = hand_increment(tmp_path)
    model = tiny_model()
    first = ewc.fisher_diagonal(model, [shards], recipe, TOK_INPUTS, place=Placement(CPU))
    again = ewc.fisher_diagonal(model, [shards], recipe, TOK_INPUTS, place=Placement(CPU))
    one = ewc.fisher_diagonal(model, [shards], recipe, TOK_INPUTS, place=Placement(CPU), batches=1)
    for name in first:
        assert torch.equal(first[name], again[name]), name
        assert (first[name] >= 0).all()
    assert not all(torch.equal(first[n], one[n]) for n in first)  # three batches, not one


def test_fisher_file_round_trips_with_its_metadata(tmp_path):
    fisher = {"a.weight": torch.rand(3, 4), "b.bias": torch.rand(5)}
    blob = ewc.fisher_bytes(fisher, {"increments": ["d0001-x"], "batches": 2})
    back = load(blob)
    for name in fisher:
        assert torch.equal(back[name], fisher[name])
    from safetensors import safe_open

    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "ewc-fisher" and json.loads(meta["about"])["increments"] == ["d0001-x"]


# ----------------------------------------------------------------------------- ewc and joint increments


def run_increment(ws: Workspace, *overrides: str, parent: str | None = None) -> tuple[object, list[str]]:
    reporter = Quiet()
    with ws.lock("train-increment"):
        result = train_increment(ws, load_recipe(ws.recipe_path, ["train.steps=4", *overrides]), parent=parent,
                                 reporter=reporter)
    return result, reporter.messages


def logged_terms(ws: Workspace, version: str) -> list[dict]:
    text = (ws.version_dir(version) / "train_log.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_ewc_writes_a_checksummed_fisher_and_penalises_the_next_increment(one_pending, tmp_path):
    ws = one_pending
    first, messages = run_increment(ws, "strategy.name=ewc")
    assert any("no penalty in this increment" in m for m in messages)  # v0000: nothing to protect yet
    assert "ewc" not in logged_terms(ws, first.version)[-1]
    manifest = ws.verify_version(first.version)  # every file, the Fisher too, matches its checksum
    assert ewc.FISHER_FILE in manifest["files"]
    fisher = ewc.load_fisher(ws, first.version)
    model, tokenizer = load_version(ws, first.version)
    assert fisher.keys() == dict(model.named_parameters()).keys()
    recipe = load_recipe(ws.recipe_path, ["train.steps=4", "strategy.name=ewc"])
    again = ewc.fisher_diagonal(model, [open_increment(ws, d) for d in first.plan.new], recipe,
                                       tokenizer_inputs(tokenizer, recipe), place=Placement(CPU))
    for name in fisher:  # reloaded = estimated on the new weights over the data just trained
        torch.testing.assert_close(fisher[name], again[name], rtol=1e-5, atol=0.0, msg=name)

    _ingest(ws, excerpt("fortunes.txt", slice(0, 200), tmp_path), "fortunes")
    second, messages = run_increment(ws, "strategy.name=ewc", "ewc.weight=1e6")
    assert not any("estimating it on" in m for m in messages)  # the parent's own file was used
    lines = logged_terms(ws, second.version)
    assert all("ewc" in line for line in lines) and lines[-1]["ewc"] > 0
    assert second.metrics["loss"]["ewc"] > 0
    assert ewc.FISHER_FILE in ws.verify_version(second.version)["files"]


def test_ewc_after_another_strategy_estimates_the_parents_fisher_on_its_lineage(two_increments):
    ws = two_increments  # v0001 was trained with replay+distill: no Fisher file
    result, messages = run_increment(ws, "strategy.name=ewc")
    assert any(f"estimating it on {ws.increments()[0]}" in m for m in messages)
    assert logged_terms(ws, result.version)[-1]["ewc"] > 0
    assert result.plan.replay_per_batch == 0 and result.metrics["loss"]["distill"] is None  # the preset's


def test_joint_retrains_from_v0000_on_the_union(two_increments, tmp_path):
    ws = two_increments
    first, second = ws.increments()
    result, _ = run_increment(ws, "strategy.name=joint")
    manifest = ws.version_manifest(result.version)
    assert manifest["parent"] == "v0001" and manifest["init_from"] == "v0000"
    assert manifest["trained_on"] == [first, second] and manifest["retrained"] == [first]
    assert manifest["new"] == [second] and manifest["replay"] == []
    assert result.plan.new == [first, second] and result.plan.replay == []
    assert set(result.metrics["eval"]["before"]) == {first, second}  # v0001's scores: the gate's reference
    assert ws.latest() == result.version

    # The same weights as a plain fine-tune from v0000 with both increments pending.
    scratch = ws.copy_to(tmp_path / "from-base")
    for version in scratch.versions()[1:]:
        shutil.rmtree(scratch.version_dir(version))
    scratch.move_latest("v0000", command="test")
    reference, _ = run_increment(scratch, "strategy.name=naive")
    assert reference.plan.new == [first, second]
    assert_same_weights(weights(ws, result.version), weights(scratch, reference.version))


@pytest.mark.parametrize("name", ALL)
def test_train_increment_accepts_every_strategy_on_the_command_line(two_increments, name):
    reset_faults()
    result = runner.invoke(app, ["train-increment", str(two_increments.root), "--dry-run", "--json",
                                 f"strategy.name={name}"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    plan = doc["plan"]
    first, second = two_increments.increments()
    assert doc["recipe"]["strategy"]["name"] == name
    assert plan["new"] == ([first, second] if name == "joint" else [second])
    assert plan["init_from"] == ("v0000" if name == "joint" else None)
    assert (plan["replay_per_batch"] > 0) == (name in ("replay", "replay+distill"))


# ----------------------------------------------------------------------------- distill.rows


def micro_outputs(teacher_rows: str = "all"):
    """5 masked positions, the first 3 from new rows; window counts 6 new, 4 replay targets."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn((5, 11), generator=g), torch.randn((5, 11), generator=g)
    picked = {"all": slice(None), "new": slice(None, 3), "replay": slice(3, None)}[teacher_rows]
    norm = Normalisers(new_targets=6.0, replay_targets=4.0, masked_targets=10.0, tokens=40.0)
    out = MicroOutputs(student, torch.zeros(5, dtype=torch.long), 3, torch.ones((2, 4)), norm, tiny_model(),
                                0, 1, 1, teacher_logits=teacher[picked], teacher_rows=teacher_rows)
    return out, student, teacher


@pytest.mark.parametrize("on", ["all", "new", "replay"])
def test_distill_on_picks_its_rows_and_divides_by_their_target_count(on):
    """distill.rows=all: KL over every masked position / all targets (the behaviour before the key);
    new: the new rows' positions / new targets; replay: the replayed rows' / replay targets. The
    same whether the teacher ran on every row or only on those rows."""
    from incr_cli.training.losses import kd_loss_sum

    rows, count = {"all": (slice(None), 10.0), "new": (slice(None, 3), 6.0), "replay": (slice(3, None), 4.0)}[on]
    out, student, teacher = micro_outputs()
    expected = kd_loss_sum(student[rows], teacher[rows], 2.0) / count
    torch.testing.assert_close(LogitDistill(1.0, 2.0, rows=on)(out), expected)
    only_those, _, _ = micro_outputs(teacher_rows=on)
    torch.testing.assert_close(LogitDistill(1.0, 2.0, rows=on)(only_those), expected)


def test_distill_on_sets_the_terms_and_the_teachers_rows():
    """The default distils on the replayed rows; with no replay there is then no KL term (and no
    teacher); the distill preset (LwF) distils on every row; hidden states need every row."""
    recipe = build_recipe({})
    assert recipe.strategy.name == "replay+distill" and recipe.distill.rows == "replay"
    terms = methods.get_strategy("replay+distill").loss_terms(recipe, has_replay=True)
    kd = next(t for t in terms if t.name == "distill")
    assert kd.rows == "replay" and teacher_rows(terms) == "replay"
    assert "distill" not in [t.name for t in methods.get_strategy("replay+distill").loss_terms(recipe, False)]
    lwf = build_recipe({"distill": {"rows": "replay"}}, overrides=["strategy.name=distill"])
    assert lwf.distill.rows == "all"
    assert teacher_rows(methods.get_strategy("distill").loss_terms(lwf, False)) == "all"
    old = build_recipe({"distill": {"rows": "all"}})
    assert teacher_rows(methods.get_strategy("replay+distill").loss_terms(old, True)) == "all"
    hidden = build_recipe({"distill": {"hidden_weight": 0.5}})
    assert teacher_rows(methods.get_strategy("replay+distill").loss_terms(hidden, True)) == "all"


def replay_distill_step(tmp_path, *, teacher_on_every_row: bool):
    """One SGD loop step of replay+distill with distill.rows=replay (4 new + 4 replayed rows, 2 micro-batches)."""
    recipe = build_recipe({**SGD, "strategy": {"name": "replay+distill"}, "replay": {"ratio": 0.5},
                           "distill": {"alpha": 1.0, "rows": "replay"}})
    new, old = hand_increment(tmp_path / "new"), hand_increment(tmp_path / "old", tag=21)
    plan = IncrementPlan("v0000", [new.id], [old.id], 40, 40, 2, 2, 1, 3, 0, T)
    spec = RunSpec(recipe, plan, [new], [old], TOK_INPUTS, loss_terms(recipe, plan))
    run, _ = build_run(tiny_model(), spec, place=Placement(CPU), ctx=DistContext(0, 1, CPU), reporter=Quiet())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a student that differs from its teacher (the parent's copy)
        for p in run.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    run.optimizer = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=0.1)
    if teacher_on_every_row:  # a zero-weight term that reads every row makes the teacher run on all of them
        run.terms.append(LogitDistill(0.0, 2.0, rows="all"))
    state = TrainState(first_bad_step=torch.tensor(-1))
    train_step(run, state, check_loss=True)
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}, state


def test_a_teacher_on_the_replayed_rows_only_gives_the_same_step(tmp_path):
    """distill.rows=replay runs the teacher on the replayed rows only (a quarter of the default's batch):
    the step equals one whose teacher ran on every row and whose KL kept the replayed rows."""
    sliced, state = replay_distill_step(tmp_path / "a", teacher_on_every_row=False)
    full, _ = replay_distill_step(tmp_path / "b", teacher_on_every_row=True)
    assert float(state.window["distill"]) > 0
    for name in sliced:
        torch.testing.assert_close(sliced[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
