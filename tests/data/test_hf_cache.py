"""`incr ingest --dataset NAME[:CONFIG]`: a dataset found in the local Hugging Face caches (the
datasets library's prepared Arrow files, the Hub's downloaded Parquet), never the network, and a
clear exit 2 for a dataset that is not there, an unknown config or split, or a malformed name."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from incr_cli.cli.app import app
from incr_cli.data import hf_cache
from incr_cli.errors import InputError
from tests.helpers_train import reset_faults

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
runner = CliRunner()


def docs(tag: str, n: int = 30) -> list[str]:
    return [f"{tag} document number {i} about the garden and the river" for i in range(n)]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty datasets and Hub caches in tmp, pointed at by the variables huggingface uses."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "datasets", tmp_path / "hub"


def prepared(root, name: str, config: str, splits: dict[str, list[str]], shards: int = 1):
    """What load_dataset leaves: NAMESPACE___NAME/CONFIG/VERSION/HASH/NAME-SPLIT[-i-of-n].arrow (stream format)."""
    folder = root / name.replace("/", "___") / config / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}")
    base = name.split("/")[-1]
    for split, texts in splits.items():
        for i in range(shards):
            part = texts[i::shards]
            suffix = f"-{i:05d}-of-{shards:05d}" if shards > 1 else ""
            table = pa.table({"text": part, "id": list(range(len(part)))})
            with pa.ipc.new_stream(folder / f"{base}-{split}{suffix}.arrow", table.schema) as w:
                w.write_table(table)
    return folder


def downloaded(root, name: str, files: dict[str, list[str]]):
    """What huggingface-cli download leaves: datasets--NS--NAME/snapshots/REV/... (symlinks to blobs), refs/main."""
    top = root / ("datasets--" + name.replace("/", "--"))
    snapshot, blobs = top / "snapshots" / "abc123", top / "blobs"
    blobs.mkdir(parents=True)
    for i, (rel, texts) in enumerate(files.items()):
        blob = blobs / f"blob{i}"
        pq.write_table(pa.table({"text": texts}), blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blob, snapshot / rel)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text("abc123")
    return snapshot


def test_the_datasets_cache_gives_the_splits_arrow_shards(caches):
    datasets, _ = caches
    prepared(datasets, "org/corpus", "default", {"train": docs("t"), "test": docs("x", 5)}, shards=3)
    found = hf_cache.find("org/corpus")
    assert found.cache == "datasets" and found.config == "default" and len(found.files) == 3
    assert all("corpus-train-" in f for f in found.files)
    assert len(hf_cache.find("org/corpus", "test").files) == 3  # its shards too
    with pytest.raises(InputError, match=r"no 'validation' split .* \(it has test, train\)"):
        hf_cache.find("org/corpus", "validation")


def test_configs_are_chosen_by_name_and_ambiguity_is_an_error(caches):
    datasets, hub = caches
    prepared(datasets, "wiki", "small", {"train": docs("s")})
    prepared(datasets, "wiki", "large", {"train": docs("l")})
    assert "small" in hf_cache.find("wiki:small").files[0]
    with pytest.raises(InputError, match=r"2 configs .* \(large, small\); name one as wiki:CONFIG"):
        hf_cache.find("wiki")
    with pytest.raises(InputError, match=r"no such config .* \(it has large, small\)"):
        hf_cache.find("wiki:medium")


def test_the_hub_cache_gives_the_parquet_files_of_a_config_and_split(caches):
    _, hub = caches
    downloaded(hub, "org/web", {"en/train-00000-of-00002.parquet": docs("a"), "en/train-00001-of-00002.parquet": docs("b"),
                                "en/test-00000-of-00001.parquet": docs("c"), "fr/train-00000-of-00001.parquet": docs("d")})
    found = hf_cache.find("org/web:en")
    assert found.cache == "hub" and [os.path.basename(f) for f in found.files] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    downloaded(hub, "flat", {"data/train-00000.parquet": docs("e"), "data/validation-00000.parquet": docs("f")})
    assert hf_cache.find("flat", "validation").files[0].endswith("validation-00000.parquet")


def test_a_dataset_that_is_not_cached_is_an_error_naming_both_caches(caches):
    datasets, hub = caches
    with pytest.raises(InputError) as err:
        hf_cache.find("nobody/nothing")
    message = str(err.value)
    assert str(datasets / "nobody___nothing") in message and str(hub / "datasets--nobody--nothing") in message
    assert "never downloads" in message


@pytest.mark.parametrize("spec", ["../etc", "a/b/c", "name:", "name:bad config", "-x"])
def test_malformed_names_are_refused(spec):
    with pytest.raises(InputError, match="--dataset"):
        hf_cache.find(spec)


def test_ingest_dataset_from_the_cache_without_the_network(caches, tiny_workspace, monkeypatch):
    datasets, _ = caches
    prepared(datasets, "org/corpus", "default", {"train": docs("cached", 60)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reset_faults()
    result = runner.invoke(app, ["ingest", str(tiny_workspace.root), "--dataset", "org/corpus", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # the "N file(s) from the datasets cache" line went to stderr
    assert doc["increment"].endswith("-corpus") and doc["documents"]["kept"] == 60
    assert [s["format"] for s in doc["sources"]] == ["arrow"]
    reset_faults()
    missing = runner.invoke(app, ["ingest", str(tiny_workspace.root), "--dataset", "org/absent"])
    assert missing.exit_code == 2 and "not in the local Hugging Face cache" in missing.output
    reset_faults()
    nothing = runner.invoke(app, ["ingest", str(tiny_workspace.root)])
    assert nothing.exit_code == 2 and "nothing to ingest" in nothing.output
