"""Builders for eval tests: increments written by hand per the on-disk contract, and versions made
from perturbed copies of the tiny model, so eval is tested without training or ingest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from incr_cli.config.recipe import build_recipe, recipe_to_dict
from incr_cli.model.weights import load_version, save_version, tokenizer_sha256
from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def pack(tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    """The contract's packing: stream = ids + [SEP] per document; rows = [CLS] + seq_len - 1 tokens."""
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.sep_token_id]
    body = seq_len - 1
    rows = []
    for start in range(0, len(stream), body):
        chunk = stream[start:start + body]
        rows.append([tokenizer.cls_token_id, *chunk] + [tokenizer.pad_token_id] * (body - len(chunk)))
    return np.asarray(rows, dtype=np.uint16).reshape(-1, seq_len)


def write_increment(ws: Workspace, name: str, docs: list[str], *, seq_len: int, heldout_rows: int) -> str:
    """data/dNNNN-NAME/ with train.bin, heldout.bin (the last ``heldout_rows`` rows) and a sealed manifest."""
    _, tokenizer = load_version(ws, "v0000")
    ids = pack(tokenizer, docs, seq_len)
    train, heldout = ids[:-heldout_rows] if heldout_rows else ids, ids[len(ids) - heldout_rows:]
    increment = ws.next_increment(name)
    with ws.staged_folder(ws.increment_dir(increment)) as tmp:
        train.tofile(tmp / "train.bin")
        heldout.tofile(tmp / "heldout.bin")
        pad = tokenizer.pad_token_id
        seal_folder(tmp, base_manifest(
            "increment", id=increment, name=name, seq_len=seq_len, dtype="uint16", pad_id=pad,
            vocab_size=len(tokenizer), tokenizer_sha256=tokenizer_sha256(tokenizer), sources=[],
            documents={"kept": len(docs), "heldout": 0, "duplicate": 0, "rejected": {}},
            sequences={"train": len(train), "heldout": len(heldout)},
            tokens={"train": int((train != pad).sum()), "heldout": int((heldout != pad).sum())}))
    return increment


def add_version(ws: Workspace, version: str, parent: str, new: list[str], *, seed: int, recipe,
                status: str = "promoted", scale: float = 0.05) -> None:
    """checkpoints/<version>: the parent's weights plus seeded noise, with a lineage manifest."""
    model, tokenizer = load_version(ws, parent)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    manifest = {"version": version, "parent": parent, "head_initialised": False,
                "trained_on": ws.trained_on(parent) + new, "new": new, "replay": ws.trained_on(parent),
                "status": status, "promoted": status == "promoted", "recipe": recipe_to_dict(recipe),
                "seeds": {"noise": seed}, "device": "cpu"}
    save_version(ws, version, model, tokenizer, manifest)
    if status == "promoted":
        ws.move_latest(version, command="test")


def lines(name: str, n: int) -> list[str]:
    return [line for line in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def build_three_versions(ws: Workspace, recipe) -> list[str]:
    """v0000 (base) -> v0001 (learned d0001-austen) -> v0002 (learned d0002-fortunes); LATEST = v0002."""
    seq_len = recipe.model.max_seq_len
    d1 = write_increment(ws, "austen", lines("austen.txt", 60), seq_len=seq_len, heldout_rows=12)
    add_version(ws, "v0001", "v0000", [d1], seed=1, recipe=recipe)
    d2 = write_increment(ws, "fortunes", lines("fortunes.txt", 80), seq_len=seq_len, heldout_rows=10)
    add_version(ws, "v0002", "v0001", [d2], seed=2, recipe=recipe)
    return [d1, d2]


def quick_recipe(recipe):
    """The test recipe on one CPU thread: on a shared 2-core machine two threads of tiny matmuls
    mostly wait for each other."""
    data = recipe_to_dict(recipe)
    data["runtime"]["num_threads"] = 1
    return build_recipe(data)


def copy_workspace(template: Path, dest: Path) -> Workspace:
    ws = Workspace(template).copy_to(dest)
    shutil.rmtree(ws.eval_dir, ignore_errors=True)  # no scores cached by the template's runs
    return ws


@pytest.fixture(scope="session")
def eval_recipe(tiny_recipe):
    return quick_recipe(tiny_recipe)


@pytest.fixture(scope="session")
def _three_template(tmp_path_factory, eval_recipe) -> tuple[Path, list[str]]:
    from incr_cli.model.weights import init_workspace

    root = tmp_path_factory.mktemp("eval-template") / "ws"
    init_workspace(root, "scratch:tiny", eval_recipe)
    incs = build_three_versions(Workspace.open(root), eval_recipe)
    return root, incs


@pytest.fixture
def three(_three_template, tmp_path) -> tuple[Workspace, list[str]]:
    """A fresh copy of a workspace with two increments and three versions (v0000 -> v0001 -> v0002)."""
    root, incs = _three_template
    return copy_workspace(root, tmp_path / "ws"), list(incs)


def tree_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Contents and mtimes of every file under ``folder`` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
