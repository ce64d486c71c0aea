"""Sentence-transformers packaging survives a line: a base's modules.json, pooling and config are
in every version and every export, byte for byte, and the export loads in SentenceTransformer with
the embeddings incr embed computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_model_dir

import incr_cli
from incr_cli.model.packaging import Pooling, declared_pooling, packaging_files
from incr_cli.scoring.embed import EmbedRequest, embed_files
from incr_cli.store.workspace import Workspace

TEXTS = ["the quick brown fox jumps over the lazy dog", "emma reads her letters in the garden",
         "a short one", "python lists hold items in order and can grow"]


def write_st_model(folder: Path, *, pooling: str = "mean", normalize: bool = True) -> Path:
    """A tiny model in sentence-transformers layout: the transformer plus pooling (and normalisation)."""
    write_tiny_model_dir(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"sentence_transformers": "3.0.0"}}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}))
    return folder


@pytest.fixture(scope="module")
def st_line(tmp_path_factory, tiny_recipe_path, samples_dir):
    """A line from a sentence-transformers base, with one trained version and its export."""
    root = tmp_path_factory.mktemp("st")
    base = write_st_model(root / "base")
    incr_cli.init(root / "ws", base=str(base), recipe=tiny_recipe_path, overrides=["train.steps=3"])
    incr_cli.ingest(root / "ws", [samples_dir / "austen.txt"], name="austen")
    assert incr_cli.train_increment(root / "ws", overrides=["gate.max_forgetting=10"]).version == "v0001"
    incr_cli.export(root / "ws", root / "out", version="v0001")
    return base, Workspace.open(root / "ws"), root / "out"


def test_every_version_and_the_export_keep_the_packaging(st_line):
    base, ws, out = st_line
    want = packaging_files(base)
    assert set(want) == {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                         "1_Pooling/config.json"}
    for folder in (ws.version_dir("v0000"), ws.version_dir("v0001"), out):
        assert packaging_files(folder) == want, folder
    assert "1_Pooling/config.json" in ws.verify_version("v0001")["files"]  # checksummed like the weights


def test_a_plain_base_gets_no_packaging(tiny_workspace):
    assert packaging_files(tiny_workspace.version_dir("v0000")) == {}
    assert declared_pooling(tiny_workspace.version_dir("v0000")) is None


def test_the_declared_pooling(tmp_path):
    assert declared_pooling(write_st_model(tmp_path / "mean")) == Pooling("mean", normalize=True)
    assert declared_pooling(write_st_model(tmp_path / "cls", pooling="cls", normalize=False)) == Pooling("cls", False)
    assert declared_pooling(write_st_model(tmp_path / "max", pooling="max")) is None  # not one incr embed computes
    dense = write_st_model(tmp_path / "dense")
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    assert declared_pooling(dense) is None


def test_incr_embed_pools_as_the_packaging_declares(st_line, tmp_path, tiny_recipe):
    _, ws, _ = st_line
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    res = embed_files(ws, "v0001", EmbedRequest([str(tmp_path / "texts.txt")], tmp_path / "e.npy"), recipe=tiny_recipe)
    assert res.pooling == "mean"
    cls_dir = write_st_model(tmp_path / "clsbase", pooling="cls")
    assert declared_pooling(cls_dir).mode == "cls"


def test_the_export_loads_in_sentence_transformers_with_incr_embeds_vectors(st_line, tmp_path, tiny_recipe):
    st = pytest.importorskip("sentence_transformers")
    _, ws, out = st_line
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    embed_files(ws, "v0001", EmbedRequest([str(tmp_path / "texts.txt")], tmp_path / "e.npy"), recipe=tiny_recipe)
    ours = np.load(tmp_path / "e.npy")
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    theirs = model.encode(TEXTS, convert_to_numpy=True)
    assert theirs.shape == ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_the_card_names_the_base_license_and_loads_from_where_it_is(tmp_path, tiny_recipe_path):
    base = write_st_model(tmp_path / "base")
    (base / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# a base\n")
    incr_cli.init(tmp_path / "ws", base=str(base), recipe=tiny_recipe_path)
    incr_cli.export(tmp_path / "ws", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    meta = card.split("---")[1]
    assert "license: apache-2.0" in meta and "unknown" not in meta
    assert "PATH/TO" not in card and f'pipeline("fill-mask", model="{tmp_path / "out"}")' in card
    assert f'SentenceTransformer("{tmp_path / "out"}")' in card


def test_a_card_without_a_known_license_says_so(st_line):
    _, _, out = st_line  # its base has no card
    meta = (out / "README.md").read_text().split("---")[1]
    assert "license: unknown" in meta and "set it (and your data's terms) before publishing" in meta
