"""Builders for the training tests: increments written by hand per the on-disk contract, a
workspace with two ingested excerpts, and a plain-MLM reference step to compare the loop with."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from incr_cli import faults
from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def write_increment(ws: Workspace, name: str, train: np.ndarray, heldout: np.ndarray, *, pad_id: int = 0,
                    dtype: str = "uint16", tokenizer_sha256: str | None = None) -> str:
    """data/dNNNN-NAME/ holding ``train`` and ``heldout`` (n, seq_len) rows, sealed like ingest's."""
    seq_len = train.shape[1] if train.size else heldout.shape[1]
    increment = ws.next_increment(name)
    with ws.staged_folder(ws.increment_dir(increment)) as tmp:
        np.ascontiguousarray(train, dtype=dtype).tofile(tmp / "train.bin")
        np.ascontiguousarray(heldout, dtype=dtype).tofile(tmp / "heldout.bin")
        seal_folder(tmp, base_manifest(
            "increment", id=increment, name=name, seq_len=seq_len, dtype=dtype, pad_id=pad_id, vocab_size=3000,
            tokenizer_sha256=tokenizer_sha256, sources=[],
            documents={"kept": len(train) + len(heldout), "heldout": len(heldout), "duplicate": 0, "rejected": {}},
            sequences={"train": len(train), "heldout": len(heldout)},
            tokens={"train": int((train != pad_id).sum()), "heldout": int((heldout != pad_id).sum())}))
    return increment


def tagged_rows(tag: int, n: int, seq_len: int, *, seed: int = 0) -> np.ndarray:
    """(n, seq_len) rows [2, tag, i % 1000, i // 1000, random ids...]: a row names its increment and index."""
    rng = np.random.default_rng([seed, tag])
    rows = rng.integers(10, 3000, size=(n, seq_len))
    rows[:, 0] = 2
    rows[:, 1] = tag
    rows[:, 2] = np.arange(n) % 1000
    rows[:, 3] = np.arange(n) // 1000
    return rows


def row_ids(rows: np.ndarray) -> list[tuple[int, int]]:
    """(tag, index) of each row written by ``tagged_rows``."""
    return [(int(r[1]), int(r[2]) + 1000 * int(r[3])) for r in rows]


def excerpt(samples_name: str, lines: slice, folder: Path) -> Path:
    """A slice of a shipped sample as its own file (one document per line)."""
    text = (SAMPLES / samples_name).read_text(encoding="utf-8").splitlines()[lines]
    path = folder / f"{Path(samples_name).stem}-{lines.start or 0}-{lines.stop}.txt"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def weights(ws: Workspace, version: str) -> dict[str, torch.Tensor]:
    return load_file(str(ws.version_dir(version) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item()}"


def reset_faults() -> None:
    """Fault counters are per process; in-process CLI runs must start from zero."""
    faults._counts.clear()


# ----------------------------------------------------------------------------- workspace templates

_TEMPLATES: dict[str, Path] = {}


def _ingest(ws: Workspace, path: Path, name: str) -> str:
    from incr_cli.config.recipe import load_recipe
    from incr_cli.data.ingest import IngestOptions, ingest

    with ws.lock("ingest"):
        result = ingest(ws, [str(path)], recipe=load_recipe(ws.recipe_path), options=IngestOptions(name=name))
    assert result.increment, result.message
    return result.increment


def template(tmp_path_factory, kind: str) -> Path:
    """A workspace built once per test session (tests take a copy through the ``workspace_copy`` fixture):

    - "one_pending": v0000 (scratch:tiny, cpu-tiny recipe) and d0001-austen pending;
    - "two_increments": v0001 trained on d0001-austen (4 steps) and d0002-fortunes pending;
    - "two_increments_no_dropout": the same from a local tiny BERT without dropout (runs that should
      agree are then free of per-process dropout streams).
    """
    if kind in _TEMPLATES:
        return _TEMPLATES[kind]
    from incr_cli.config.recipe import load_recipe
    from incr_cli.line.increment import train_increment
    from incr_cli.model.weights import init_workspace

    root = tmp_path_factory.mktemp(f"train-{kind}") / "ws"
    texts = root.parent / "texts"
    texts.mkdir()
    if kind == "one_pending":
        init_workspace(root, "scratch:tiny", load_recipe(REPO / "recipes" / "cpu-tiny.yaml"))
        _ingest(Workspace.open(root), excerpt("austen.txt", slice(0, 400), texts), "austen")
    elif kind == "two_increments_no_dropout":
        from tests.conftest import write_tiny_model_dir

        init_workspace(root, str(write_tiny_model_dir(root.parent / "model", dropout=0.0)),
                       load_recipe(REPO / "recipes" / "cpu-tiny.yaml"))
        ws = Workspace.open(root)
        _ingest(ws, excerpt("austen.txt", slice(0, 400), texts), "austen")
        with ws.lock("train-increment"):
            train_increment(ws, load_recipe(ws.recipe_path, ["train.steps=4"]))
        _ingest(ws, excerpt("fortunes.txt", slice(0, 400), texts), "fortunes")
    elif kind == "two_increments":
        ws = Workspace(template(tmp_path_factory, "one_pending")).copy_to(root)
        with ws.lock("train-increment"):
            train_increment(ws, load_recipe(ws.recipe_path, ["train.steps=4"]))
        _ingest(ws, excerpt("fortunes.txt", slice(0, 400), texts), "fortunes")
    else:
        raise ValueError(kind)
    shutil.rmtree(root / "staging", ignore_errors=True)
    (root / ".incr.lock").unlink(missing_ok=True)
    _TEMPLATES[kind] = root
    return root


def tiny_model(seed: int = 0):
    """A BertForMaskedLM for the tiny vocabulary (3000 ids; hidden 32, 2 layers, no dropout)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=3000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def assert_fill_mask_agrees(fill, text: str, k: int = 3) -> list[dict]:
    """transformers' fill-mask pipeline on ``text`` gives the model's own top ``k``: the ids of the
    highest logits at the mask, in order, with their softmax probabilities. -> the predictions."""
    predictions = fill(text, top_k=k)
    enc = fill.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = fill.model(**enc).logits[0, enc["input_ids"][0].tolist().index(fill.tokenizer.mask_token_id)]
    probs, ids = logits.float().softmax(-1).topk(k)
    assert [p["token"] for p in predictions] == ids.tolist(), (predictions, ids)
    assert all(abs(p["score"] - q) < 1e-4 for p, q in zip(predictions, probs.tolist()))
    assert all(isinstance(p["token_str"], str) and p["sequence"] for p in predictions)
    return predictions
