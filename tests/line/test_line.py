"""Running a model line over time, through the CLI: the audit trail and `current`, promote and
rollback, gc, export with a model card; every fault and bad input of the README's rows for them."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import yaml

from incr_cli.config.recipe import load_recipe
from incr_cli.line.retention import keep_reasons
from incr_cli.store.files import folder_bytes
from incr_cli.store.workspace import Workspace
from tests.helpers_reliability import assert_one_error_line, assert_only_complete_versions, cli, run_incr
from tests.helpers_train import excerpt

FAST = ["train.steps=4", "eval.max_sequences=8", "runtime.num_threads=1"]


@pytest.fixture(scope="module")
def line_template(tmp_path_factory, workspace_copy) -> Workspace:
    """v0000 base, v0001 (austen) and v0002 (fortunes) promoted, v0003 (pydocs) rejected by the gate."""
    ws = workspace_copy("two_increments", tmp_path_factory.mktemp("line") / "ws")
    assert cli("train-increment", ws.root, *FAST).exit_code == 0
    texts = ws.root.parent / "texts"
    texts.mkdir()
    assert cli("ingest", ws.root, excerpt("pydocs.txt", slice(0, 300), texts), "--name", "pydocs").exit_code == 0
    rejected = cli("train-increment", ws.root, *FAST, "gate.min_improvement=0.99")
    assert rejected.exit_code == 3, rejected.output
    assert cli("eval", ws.root, "--versions", "all", "eval.max_sequences=8").exit_code == 0  # fills the cache
    shutil.rmtree(ws.staging, ignore_errors=True)
    return ws


@pytest.fixture
def line(line_template, tmp_path) -> Workspace:
    return line_template.copy_to(tmp_path / "ws")


def moves(ws: Workspace) -> list[dict]:
    result = cli("history", ws.root, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["moves"]


def test_every_move_of_latest_is_recorded_and_current_follows(line):
    ws = line
    assert [(m["from"], m["to"], m["command"]) for m in moves(ws)] == [
        (None, "v0000", "init"), ("v0000", "v0001", "train-increment"), ("v0001", "v0002", "train-increment")]
    record = moves(ws)[-1]
    assert record["user"] and record["host"] and record["time"] and record["exit_state"] == "completed"
    assert os.readlink(ws.current_path) == "checkpoints/v0002"
    status = cli("status", ws.root)
    assert status.exit_code == 0 and "last moves of LATEST" in status.stdout and "train-increment" in status.stdout
    text = cli("history", ws.root)
    assert text.exit_code == 0 and "v0001" in text.stdout and "init" in text.stdout

    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(ws.current_path))  # the serving path
    assert model.config.vocab_size > 0


def test_promote_a_rejected_version_after_review_is_idempotent(line):
    ws = line
    assert ws.version_manifest("v0003")["status"] == "rejected"
    result = cli("promote", ws.root, "v0003", "--reason", "reviewed by ana: gate too strict")
    assert result.exit_code == 0, result.output
    assert ws.latest() == "v0003" and os.readlink(ws.current_path) == "checkpoints/v0003"
    last = moves(ws)[-1]
    assert (last["from"], last["to"], last["command"], last["reason"]) == (
        "v0002", "v0003", "promote", "reviewed by ana: gate too strict")
    again = cli("promote", ws.root, "3", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["moved"] is False
    assert len(moves(ws)) == 4  # the repeat recorded nothing
    status = json.loads(cli("status", ws.root, "--json").stdout)
    assert {v["version"]: v["promoted_by_hand"] for v in status["versions"]}["v0003"]
    assert "v0003" in json.loads(cli("eval", ws.root, "--json", "eval.max_sequences=8").stdout)["lineage"]


def test_rollback_walks_back_the_trail_and_pending_increments_follow(line):
    ws = line
    assert cli("promote", ws.root, "v0003").exit_code == 0
    walked = []
    for _ in range(3):
        result = cli("rollback", ws.root, "--reason", "bad answers in prod", "--json")
        assert result.exit_code == 0, result.output
        walked.append(json.loads(result.stdout)["latest"])
    assert walked == ["v0002", "v0001", "v0000"]
    assert ws.pending("v0000") == ws.increments()
    end = cli("rollback", ws.root)
    assert end.exit_code == 2
    assert_one_error_line(end.stderr, "records no version before v0000", "incr promote")
    assert cli("promote", ws.root, "v0001").exit_code == 0
    plan = cli("train-increment", ws.root, "--dry-run", "--json")
    assert plan.exit_code == 0, plan.output
    body = json.loads(plan.stdout)
    assert body["plan"]["parent"] == "v0001"
    assert body["plan"]["new"] == [d for d in ws.increments() if not d.startswith("d0001")]


@pytest.mark.parametrize("command", [["promote", "v0001"], ["rollback"], ["gc", "--keep-last", "2"]])
def test_a_locked_workspace_exits_75(line, command):
    with line.lock("train-increment"):
        result = cli(command[0], line.root, *command[1:])
    assert result.exit_code == 75
    assert_one_error_line(result.stderr, "is locked by PID")
    assert line.latest() == "v0002" and len(moves(line)) == 3


def test_unknown_damaged_and_pruned_targets_exit_2_naming_them(line, line_template):
    ws = line
    unknown = cli("promote", ws.root, "v0042")
    assert unknown.exit_code == 2
    assert_one_error_line(unknown.stderr, "unknown version 'v0042'", "v0003")
    weights = ws.version_dir("v0001") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    damaged = cli("promote", ws.root, "v0001")
    assert damaged.exit_code == 2
    assert_one_error_line(damaged.stderr, "v0001: file model.safetensors has")
    rolled = cli("rollback", ws.root)
    assert rolled.exit_code == 2
    assert_one_error_line(rolled.stderr, "v0001: file model.safetensors has")
    assert ws.latest() == "v0002" and len(moves(ws)) == 3
    shutil.rmtree(ws.version_dir("v0001"))
    shutil.copytree(line_template.version_dir("v0001"), ws.version_dir("v0001"))  # repaired
    assert cli("gc", ws.root, "--keep-last", "1").exit_code == 0
    pruned = cli("promote", ws.root, "v0001")
    assert pruned.exit_code == 2
    assert_one_error_line(pruned.stderr, "v0001 was pruned by gc", "v0002")


@pytest.mark.parametrize("point", ["latest.write", "latest.link", "latest.record"])
def test_kill_9_during_promote_then_rerun_completes_it_once(line, point):
    ws = line
    killed = run_incr("promote", ws.root, "v0003", fault=f"{point}:kill")
    assert killed.returncode == -9, killed.stderr
    assert ws.latest() in ("v0002", "v0003")  # always a complete version
    assert ws.current_target() in ("v0002", "v0003") and (ws.current_path / "config.json").is_file()
    assert len(moves(ws)) == 3  # the record is written last: history stays readable
    rerun = cli("promote", ws.root, "v0003")
    assert rerun.exit_code == 0, rerun.output
    assert ws.latest() == "v0003" and ws.current_target() == "v0003"
    trail = moves(ws)
    assert [(m["from"], m["to"]) for m in trail[3:]] == [("v0002", "v0003")]
    expected = "completed" if point == "latest.write" else "completed after an interruption"
    assert trail[-1]["exit_state"] == expected
    assert_only_complete_versions(ws)


@pytest.mark.parametrize("point", ["latest.write", "latest.record"])
def test_kill_9_during_rollback_then_rerun_rolls_back_once(line, point):
    ws = line
    killed = run_incr("rollback", ws.root, fault=f"{point}:kill")
    assert killed.returncode == -9, killed.stderr
    rerun = cli("rollback", ws.root, "--json")
    assert rerun.exit_code == 0, rerun.output
    assert ws.latest() == "v0001" and ws.current_target() == "v0001"  # one step back, not two
    assert [(m["from"], m["to"], m["command"]) for m in moves(ws)[3:]] == [("v0002", "v0001", "rollback")]
    assert_only_complete_versions(ws)


def test_a_torn_history_line_is_skipped_and_the_next_move_is_readable(line):
    ws = line
    with open(ws.history_path, "ab") as f:
        f.write(b'{"id": "torn", "time": "2026-')  # a crash mid-append: no newline
    report = json.loads(cli("history", ws.root, "--json").stdout)
    assert report["damaged_lines"] == 1 and len(report["moves"]) == 3
    assert cli("promote", ws.root, "v0001").exit_code == 0
    report = json.loads(cli("history", ws.root, "--json").stdout)
    assert report["damaged_lines"] == 1 and report["moves"][-1]["to"] == "v0001"
    assert cli("rollback", ws.root).exit_code == 0 and ws.latest() == "v0002"


# ----------------------------------------------------------------------------- gc


def test_gc_keeps_latest_and_the_newest_prunes_the_rest_and_verify_stays_clean(line):
    ws = line
    before_eval = json.loads(cli("eval", ws.root, "--versions", "all", "--json", "eval.max_sequences=8").stdout)
    (ws.staging / "tmp-v0009-dead").mkdir(parents=True)
    (ws.staging / "tmp-v0009-dead" / "model.safetensors").write_bytes(b"x" * 1000)
    size_before = folder_bytes(ws.root)
    dry = cli("gc", ws.root, "--keep-last", "1", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["pruned"] == ["v0000", "v0001"] and plan["bytes_freed"] > 1000
    assert folder_bytes(ws.root) == size_before and ws.pruned("v0000") is None  # nothing removed
    result = cli("gc", ws.root, "--keep-last", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kept"] == {"v0002": ["LATEST", "rollback chain"], "v0003": ["one of the 1 newest"]}
    records = sum((ws.version_dir(v) / "pruned.json").stat().st_size for v in ("v0000", "v0001"))
    assert report["bytes_freed"] == plan["bytes_freed"] == size_before - folder_bytes(ws.root) + records
    assert report["staging_leftovers"] == ["tmp-v0009-dead"] and report["cache_entries"] > 0
    assert sorted(p.name for p in ws.version_dir("v0001").iterdir()) == [
        "manifest.json", "metrics.json", "pruned.json", "train_log.jsonl"]
    assert len(ws.increments()) == 3  # data is never removed
    report = assert_only_complete_versions(ws)
    assert {v["version"]: v["pruned"] for v in report["versions"]} == {
        "v0000": True, "v0001": True, "v0002": False, "v0003": False}
    after_eval = json.loads(cli("eval", ws.root, "--versions", "all", "--json", "eval.max_sequences=8").stdout)
    assert [v["version"] for v in after_eval["versions"]] == ["v0000", "v0001", "v0002", "v0003"]
    assert after_eval["matrix"] == before_eval["matrix"]  # pruned rows keep their recorded scores
    assert after_eval["cache"]["misses"] == 0
    table = cli("eval", ws.root, "--versions", "all", "eval.max_sequences=8")
    assert "v0001 (pruned)" in table.stdout
    text = cli("gc", ws.root, "--keep-last", "1")
    assert text.exit_code == 0 and "freed 0 B" in text.stdout  # a second gc has nothing left to do


def test_gc_bad_policies_exit_2(line):
    zero = cli("gc", line.root, "--keep-last", "0")
    assert zero.exit_code == 2
    assert_one_error_line(zero.stderr, "--keep-last 0: must be at least 1")
    none = cli("gc", line.root)
    assert none.exit_code == 2
    assert_one_error_line(none.stderr, "no retention policy", "retention.keep_last")
    assert line.pruned("v0000") is None


def test_gc_reads_retention_keep_last_from_the_recipe_and_keeps_what_training_needs(line):
    ws = line
    assert "joint trains from it" in keep_reasons(ws, load_recipe(ws.recipe_path, ["strategy.name=joint"]), 1)["v0000"]
    live = ws.resume_dir / "live"
    (live / "state-00000002").mkdir(parents=True)
    (live / "CURRENT").write_text("state-00000002")
    (live / "state-00000002" / "meta.json").write_text(json.dumps({"parent": "v0002", "new": ["x"], "steps": 4}))
    stale = ws.resume_dir / "stale"
    (stale / "state-00000002").mkdir(parents=True)
    (stale / "CURRENT").write_text("state-00000002")
    (stale / "state-00000002" / "meta.json").write_text(json.dumps({"parent": "v0001", "new": ["x"], "steps": 4}))
    ws.recipe_path.write_text(ws.recipe_path.read_text().replace("keep_last: null", "keep_last: 1"))
    assert load_recipe(ws.recipe_path).retention.keep_last == 1
    result = cli("gc", ws.root, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["keep_last"] == 1 and "parent of a resumable state" in report["kept"]["v0002"]
    assert live.is_dir() and not stale.exists() and report["resume_states"] == [str(stale)]


def test_kill_9_during_gc_then_rerun_finishes_and_verify_is_clean(line):
    ws = line
    killed = run_incr("gc", ws.root, "--keep-last", "1", fault="gc.prune:kill")
    assert killed.returncode == -9, killed.stderr
    assert ws.pruned("v0000") is not None  # recorded first, then removed
    assert_only_complete_versions(ws)
    rerun = cli("gc", ws.root, "--keep-last", "1", "--json")
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["already_pruned"] == ["v0000"]
    for version in ("v0000", "v0001"):
        assert not (ws.version_dir(version) / "model.safetensors").exists()
    assert cli("verify", ws.root, "--all").exit_code == 0


# ----------------------------------------------------------------------------- export


def test_export_writes_a_loadable_folder_with_a_model_card(line, tmp_path):
    from transformers import AutoModelForMaskedLM, pipeline

    full, half = tmp_path / "fp32", tmp_path / "fp16"
    assert cli("export", line.root, full).exit_code == 0
    result = cli("export", line.root, half, "--version", "v0001", "--dtype", "fp16", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == "v0001"
    weights = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < weights < 0.55
    card = (full / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert meta["license"] == "unknown"  # a scratch base has no card: the user sets it before publishing
    assert "PATH/TO" not in card and f'model="{full.resolve()}"' in card
    for fragment in ("## Lineage", "| v0002 | v0001 | promoted |", "d0002-fortunes", "## Recipe", "forgetting"):
        assert fragment in card, fragment
    model = AutoModelForMaskedLM.from_pretrained(str(half))
    assert str(next(model.parameters()).dtype) == "torch.float16"
    fill = pipeline("fill-mask", model=str(full))
    assert len(fill(f"the {fill.tokenizer.mask_token} of it")) == 5


def test_export_refuses_an_existing_out_a_pruned_version_and_a_kill_leaves_nothing(line, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    exists = cli("export", line.root, out)
    assert exists.exit_code == 2
    assert_one_error_line(exists.stderr, f"{out}: already exists")
    out.rmdir()
    killed = run_incr("export", line.root, out, fault="export.write:kill")
    assert killed.returncode == -9 and not out.exists()
    rerun = cli("export", line.root, out, "--dtype", "bf16")
    assert rerun.exit_code == 0, rerun.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ws"]  # the killed run's folder is gone
    assert cli("gc", line.root, "--keep-last", "1").exit_code == 0
    pruned = cli("export", line.root, tmp_path / "old", "--version", "v0000")
    assert pruned.exit_code == 2
    assert_one_error_line(pruned.stderr, "v0000 was pruned by gc")
    bad = cli("export", line.root, tmp_path / "int4", "--dtype", "int4")
    assert bad.exit_code == 2
    assert_one_error_line(bad.stderr, "--dtype int4")


@pytest.mark.slow
def test_export_int8_onnx_serves_fill_mask_and_embeddings_like_fp32(line, tmp_path):
    """--quantize int8 writes two ONNX graphs that ONNX Runtime loads with README's lines; their
    logits and embeddings stay close to the fp32 model's."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from incr_cli.scoring.embed import embed_ids

    out = tmp_path / "int8"
    result = cli("export", line.root, out, "--quantize", "int8", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout holds the JSON alone: the exporter's own output is kept off it
    assert doc["dtype"] == "int8" and doc["format"] == "onnx" and doc["version"] == "v0002"
    assert {"model.onnx", "encoder.onnx", "config.json", "README.md"} <= set(doc["files"])
    assert not any(name.endswith(".safetensors") for name in doc["files"])
    card = (out / "README.md").read_text()
    assert "int8" in card and "onnxruntime" in card and "sentence_embedding" in card

    tok = AutoTokenizer.from_pretrained(str(out))  # the README's lines, as a user runs them
    enc = tok(["the cat sat on the mat and looked at the door", f"it was a {tok.mask_token} day"],
              padding=True, return_tensors="np")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    logits = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], inputs)[0]
    emb = ort.InferenceSession(str(out / "encoder.onnx")).run(["sentence_embedding"], inputs)[0]

    model = AutoModelForMaskedLM.from_pretrained(str(line.version_dir("v0002"))).eval()
    ids, att = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=att).logits.numpy()  # (B, T, V)
    ref_emb = embed_ids(model, ids, att.bool())  # incr embed's default pooling
    assert logits.shape == ref.shape and emb.shape == ref_emb.shape
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()  # int8 weights: close, not equal
    assert (np.sum(emb * ref_emb, axis=1) > 0.99).all()  # cosine to the fp32 embeddings
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)

    fp32 = tmp_path / "fp32"  # --format onnx: the same graphs unquantised, the yardstick for size and operators
    plain = cli("export", line.root, fp32, "--format", "onnx", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["dtype"] == "fp32" and json.loads(plain.stdout)["format"] == "onnx"
    plain_logits = ort.InferenceSession(str(fp32 / "model.onnx")).run(["logits"], inputs)[0]
    assert np.abs(plain_logits - ref).max() < 1e-3 * np.abs(ref).max()  # fp32 graph: the model itself
    for graph in ("model.onnx", "encoder.onnx"):
        quantised, unquantised = onnx_weights(out / graph), onnx_weights(fp32 / graph)
        assert (out / graph).stat().st_size < 0.5 * (fp32 / graph).stat().st_size, graph
        # the weights are 8-bit: int8 for the matrix products, uint8 for the embedding tables' Gather
        assert quantised["8bit_bytes"] > 0.75 * quantised["bytes"], (graph, quantised)
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= quantised["ops"], (graph, quantised["ops"])
        assert unquantised["8bit_bytes"] == 0 and "MatMulInteger" not in unquantised["ops"], graph


def onnx_weights(path) -> dict:
    """An ONNX graph's operator types, and the bytes of its initializers: all, and 8-bit only."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    sizes = [(t.data_type, numpy_helper.to_array(t).nbytes) for t in graph.initializer]
    return {"ops": {n.op_type for n in graph.node}, "bytes": sum(n for _, n in sizes),
            "8bit_bytes": sum(n for kind, n in sizes if kind in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))}


def test_export_int8_bad_input_is_one_line_and_writes_nothing(line, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    exists = cli("export", line.root, out, "--quantize", "int8")
    assert exists.exit_code == 2
    assert_one_error_line(exists.stderr, f"{out}: already exists")
    for args, fragment in [(["--quantize", "int4"], "--quantize int4: choose one of int8"),
                           (["--quantize", "int8", "--dtype", "fp16"], "leave out --dtype fp16"),
                           (["--quantize", "int8", "--version", "v0042"], "v0042"),
                           (["--format", "tflite"], "--format tflite: choose one of safetensors, onnx"),
                           (["--format", "onnx", "--dtype", "bf16"], "--format onnx writes fp32 graphs")]:
        bad = cli("export", line.root, tmp_path / "new", *args)
        assert bad.exit_code == 2, (args, bad.output)
        assert_one_error_line(bad.stderr, fragment)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed: its import fails
    missing = cli("export", line.root, tmp_path / "new", "--quantize", "int8")
    assert missing.exit_code == 2
    assert_one_error_line(missing.stderr, "ONNX export needs ONNX Runtime", "pip install 'incr-cli[onnx]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ws"]  # nothing written, nothing left beside
