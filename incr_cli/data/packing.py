"""Tokenizing and packing: documents tokenized in batches and packed into fixed-length rows, written
as token shards (``PackedWriter``), read back memory-mapped by ``shards``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from incr_cli.errors import UsageError

# ----------------------------------------------------------------------------- packing


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "int32"


class PackedWriter:
    """Packs documents into fixed-length rows and appends them to a raw (n, seq_len) array file.

    The stream is every document's ids followed by ``sep_id``; each row is ``cls_id`` + the next
    seq_len - 1 stream tokens. Only the last row (written by ``close``) may be padded with ``pad_id``.
    """

    def __init__(self, path: Path, seq_len: int, *, cls_id: int, sep_id: int, pad_id: int, dtype: str):
        self.path = path
        self.seq_len, self.body = seq_len, seq_len - 1
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.tokens = 0  # non-pad tokens written, [CLS] and [SEP] included
        self._carry = np.empty(0, self.dtype)  # stream tokens not yet in a full row
        self._buf = np.empty((0, seq_len), self.dtype)  # rows of one batch, reused
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        """Append documents (lists of token ids, no special tokens) to the stream."""
        if not docs:
            return
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        self.add_flat(np.fromiter(chain.from_iterable(docs), self.dtype, int(lengths.sum())), lengths)

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their ids laid end to end, flat (N,), and their lengths (D,)."""
        if not len(lengths):
            return
        n_new = int(lengths.sum()) + len(lengths)
        stream = np.empty(len(self._carry) + n_new, self.dtype)
        stream[: len(self._carry)] = self._carry
        new = stream[len(self._carry):]
        sep_at = np.cumsum(lengths + 1) - 1  # (D,) position of each document's [SEP]
        is_token = np.ones(n_new, bool)
        is_token[sep_at] = False
        new[sep_at] = self.sep_id
        new[is_token] = flat
        n_rows = len(stream) // self.body
        if n_rows:
            if len(self._buf) < n_rows:
                self._buf = np.empty((max(n_rows, 2 * len(self._buf)), self.seq_len), self.dtype)
                self._buf[:, 0] = self.cls_id
            rows = self._buf[:n_rows]  # (R, T)
            rows[:, 1:] = stream[: n_rows * self.body].reshape(n_rows, self.body)
            rows.tofile(self._file)
            self.rows += n_rows
            self.tokens += n_rows * self.seq_len
        self._carry = stream[n_rows * self.body:].copy()

    def close(self) -> None:
        """Write the padded remainder row (if any) and close the file."""
        if len(self._carry):
            row = np.full(self.seq_len, self.pad_id, self.dtype)
            row[0] = self.cls_id
            row[1: 1 + len(self._carry)] = self._carry
            row.tofile(self._file)
            self.rows += 1
            self.tokens += 1 + len(self._carry)
            self._carry = self._carry[:0]
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def tokenize_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens; "[SEP]" written in a text stays plain text."""
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     split_special_tokens=True, verbose=False)["input_ids"]


def tokenize_with_offsets(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """``tokenize_batch`` plus each token's (start, end) character span in its text.

    A fast tokenizer is called through its Rust backend directly: transformers' wrapper turns each
    encoding into Python dicts and lists first, about a fifth of ingest's tokenizing time, for the
    same ids and spans (no truncation, no padding, special-token text split like any other)."""
    with _plain_backend(tokenizer) as backend:
        if backend is None:
            enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                            return_offsets_mapping=True, split_special_tokens=True, verbose=False)
            return enc["input_ids"], enc["offset_mapping"]
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]


@contextlib.contextmanager
def _plain_backend(tokenizer: Any) -> Iterator[Any]:
    """The fast tokenizer's Rust backend set to encode as ``tokenize_batch`` does (no truncation, no
    padding, "[MASK]" in a text is text), its settings restored after; None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        yield None
        return
    saved = backend.truncation, backend.padding, backend.encode_special_tokens
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = True
    try:
        yield backend
    finally:
        truncation, padding, backend.encode_special_tokens = saved
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**{k: v for k, v in padding.items() if k != "length" or v is not None})


PRINTABLE_ASCII = "".join(map(chr, range(32, 127)))


def covers_printable_ascii(tokenizer: Any) -> bool:
    """True when no printable ASCII character is dropped: each one, alone and in runs, lies inside some
    token's span. Then a text of printable ASCII loses no character (its [UNK] tokens are counted apart)."""
    probes = [PRINTABLE_ASCII, " ".join(PRINTABLE_ASCII), PRINTABLE_ASCII[::-1], "a``b''c--d..e"]
    _, spans = tokenize_with_offsets(tokenizer, probes)
    for text, doc_spans in zip(probes, spans):
        covered = np.zeros(len(text) + 1, bool)
        for start, end in doc_spans:
            covered[start:end] = True
        if any(ch != " " and not covered[i] for i, ch in enumerate(text)):
            return False
    return True


def tokenize_for_coverage(tokenizer: Any, texts: list[str], *, plain_covered: bool, unk_id: int | None
                          ) -> tuple[list[list[int]], list[list[tuple[int, int]] | None]]:
    """``tokenize_with_offsets``, the spans left out (None) for texts of printable ASCII without an
    unknown token when ``plain_covered`` (``covers_printable_ascii``): they lose no character, and
    encoding without spans is a fifth faster. The ids are the same either way."""
    plain = [i for i, t in enumerate(texts) if t.isascii() and t.isprintable()] if plain_covered else []
    with _plain_backend(tokenizer) as backend:
        if backend is None or not plain or not hasattr(backend, "encode_batch_fast"):
            return tokenize_with_offsets(tokenizer, texts)
        fast = backend.encode_batch_fast([texts[i] for i in plain], add_special_tokens=False)
    ids: list[Any] = [None] * len(texts)
    spans: list[Any] = [None] * len(texts)
    for i, e in zip(plain, fast):
        ids[i] = e.ids
    exact = [i for i in range(len(texts)) if ids[i] is None or (unk_id is not None and unk_id in ids[i])]
    if exact:
        exact_ids, exact_spans = tokenize_with_offsets(tokenizer, [texts[i] for i in exact])
        for i, doc_ids, doc_spans in zip(exact, exact_ids, exact_spans):
            ids[i], spans[i] = doc_ids, doc_spans
    return ids, spans


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise UsageError("the workspace tokenizer has no [CLS]/<s>, [SEP]/</s> or [PAD] token; "
                         "ingest packs sequences with them: use a BERT-family tokenizer")
    return int(cls_id), int(sep_id), int(pad_id)
