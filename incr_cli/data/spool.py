"""Between ingest's two passes: the kept documents spooled to disk, and how pass 2 packs them.

Pass 1 keeps a document (cleaned, not seen before) and spools it with its hash; once every document is
read, the held-out cutoff is known and pass 2 packs each spooled document into the train or the
held-out rows. Two spools:

- ``TokenSpool`` (the usual case): each batch of kept documents is tokenized in a worker thread while
  pass 1 reads on (the fast tokenizer releases the GIL while it encodes), and its token ids go to
  disk; pass 2 only packs them (``pack_tokens``). It needs the final tokenizer before pass 1 starts
  and no word segmentation.
- ``TextSpool``: the texts, one per line, tokenized in pass 2 (``tokenize_pack``, the next batch
  encoding while this one packs): when vocabulary growth chooses the tokenizer from the words pass 1
  saw, or whole-word masking may segment Chinese from the texts and their tokens' offsets.

Both write the same rows: the same documents, in the same order, with the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from incr_cli.data.coverage import Coverage
from incr_cli.data.dedup import hash_unit
from incr_cli.data.packing import (
    PackedWriter,
    covers_printable_ascii,
    tokenize_for_coverage,
    tokenize_with_offsets,
)
from incr_cli.data.readers import Tally
from incr_cli.data.segment import WORDS_SUFFIX, ChineseWords
from incr_cli.faults import fault_point
from incr_cli.progress import Reporter

HASH_BYTES = 16  # one document's hash in the .hash spool (dedup.doc_hash)


class Splits:
    """The train and held-out writers of an increment, and with a segmenter their word-boundary twins
    (``train.words.bin``, ``heldout.words.bin``: the same row layout, uint8, 1 = continues a word)."""

    def __init__(self, folder: Path, seq_len: int, segmenter: ChineseWords | None, **kw: Any):
        self.segmenter = segmenter
        self.train = PackedWriter(folder / "train.bin", seq_len, **kw)
        self.heldout = PackedWriter(folder / "heldout.bin", seq_len, **kw)
        self.words = None
        if segmenter is not None:
            bits = {"cls_id": 0, "sep_id": 0, "pad_id": 0, "dtype": "uint8"}
            self.words = (PackedWriter(folder / f"train{WORDS_SUFFIX}", seq_len, **bits),
                          PackedWriter(folder / f"heldout{WORDS_SUFFIX}", seq_len, **bits))

    def add(self, docs: list[tuple[bool, list[int], str, list[tuple[int, int]]]]) -> None:
        """docs: (held out?, token ids, text, offsets) of each document, in order."""
        for k, (writer, held) in enumerate(((self.train, False), (self.heldout, True))):
            chosen = [d for d in docs if d[0] == held]
            writer.add([ids for _, ids, _, _ in chosen])
            if self.words is not None:
                self.words[k].add([self.segmenter.continues(text, spans) for _, _, text, spans in chosen])

    def add_flat(self, held: np.ndarray, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents as their ids end to end, flat (N,), their lengths (D,) and held (D,) bool."""
        per_token = np.repeat(held, lengths)  # (N,)
        self.train.add_flat(flat[~per_token], lengths[~held])
        self.heldout.add_flat(flat[per_token], lengths[held])

    @property
    def tokens(self) -> int:
        return self.train.tokens + self.heldout.tokens

    def close(self) -> None:
        for writer in (self.train, self.heldout, *(self.words or ())):
            writer.close()


# ----------------------------------------------------------------------------- the spools of pass 1


class TextSpool:
    """Kept documents as text, one per line (cleaning removed every newline): ``spool``.txt."""

    def __init__(self, spool: Path):
        self.path = spool.with_suffix(".txt")
        self._file = open(self.path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed in close()

    def add(self, texts: list[str]) -> None:
        self._file.write("\n".join(texts) + "\n")

    def close(self) -> None:
        self._file.close()

    abort = close


class TokenSpool:
    """Kept documents as token ids, tokenized in a worker thread while pass 1 reads on: ``spool``.ids
    holds per batch its document count (uint32), their lengths (uint32 each) and their ids end to end
    (``dtype``). ``coverage`` counts each batch's unknown tokens and dropped characters on the way."""

    def __init__(self, spool: Path, tokenizer: Any, coverage: Coverage, dtype: str):
        self.path, self.tokenizer, self.coverage, self.dtype = spool.with_suffix(".ids"), tokenizer, coverage, dtype
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="incr-tokenize")
        self._pending: tuple[list[str], Future] | None = None
        self._encode = _encoder(tokenizer, with_spans=False)

    def add(self, texts: list[str]) -> None:
        """Hand ``texts`` to the tokenizer; write the previous batch's ids (at most two batches held)."""
        self._drain()
        self._pending = (texts, self._pool.submit(self._encode, texts))

    def _drain(self) -> None:
        if self._pending is None:
            return
        texts, encoded = self._pending
        self._pending = None
        ids, offsets = encoded.result()
        self.coverage.add(texts, ids, offsets)
        lengths = np.fromiter(map(len, ids), np.uint32, len(ids))
        self._file.write(np.uint32(len(ids)).tobytes() + lengths.tobytes())
        flat = np.fromiter(chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        self._file.write(flat.tobytes())

    def close(self) -> None:
        """Write the last batch and close."""
        try:
            self._drain()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is still being tokenized (pass 1 failed: the spool is discarded)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._file.close()


def _encoder(tokenizer: Any, *, with_spans: bool) -> Any:
    """texts -> (ids, spans) for a batch: every span when a segmenter needs them, else only those the
    coverage count needs (``packing.tokenize_for_coverage``)."""
    if with_spans:
        return lambda texts: tokenize_with_offsets(tokenizer, texts)
    plain = covers_printable_ascii(tokenizer)
    unk = getattr(tokenizer, "unk_token_id", None)
    return lambda texts: tokenize_for_coverage(tokenizer, texts, plain_covered=plain, unk_id=unk)


def _token_batches(path: Path, dtype: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``TokenSpool``'s batches back: (lengths (D,) int64, ids end to end (N,))."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        while head := f.read(4):
            n = int(np.frombuffer(head, np.uint32)[0])
            lengths = np.frombuffer(f.read(4 * n), np.uint32).astype(np.int64)
            yield lengths, np.frombuffer(f.read(itemsize * int(lengths.sum())), dtype)


# ----------------------------------------------------------------------------- pass 2


@dataclass(frozen=True)
class Packing:
    """Pass 2's inputs and outputs: the spooled documents (``spool``: .txt or .ids, and .hash), the hash
    unit below which a document is held out, the tokenizer, the writers of both splits, the coverage
    count of unknown tokens and uncovered characters, and documents per batch (``data.batch_docs``)."""

    spool: Path
    cutoff: float
    tokenizer: Any
    splits: Splits
    coverage: Coverage
    batch_docs: int


def _held_out(digests: bytes, cutoff: float) -> np.ndarray:
    """The documents of a batch, given their hashes end to end, that go to the held-out split (D,) bool."""
    return np.array([hash_unit(digests[k: k + HASH_BYTES]) < cutoff for k in range(0, len(digests), HASH_BYTES)],
                    dtype=bool)


def pack_tokens(pack: Packing, dtype: str, *, tally: Tally, reporter: Reporter, total: int) -> tuple[int, int]:
    """Pass 2 of a ``TokenSpool``: pack its batches; return (train, heldout) docs (no-token ones rejected)."""
    n_train = n_heldout = 0
    with open(pack.spool.with_suffix(".hash"), "rb") as hash_file, \
            reporter.progress("packing", total=total, unit="docs") as bar:
        for lengths, flat in _token_batches(pack.spool.with_suffix(".ids"), dtype):
            held = _held_out(hash_file.read(HASH_BYTES * len(lengths)), pack.cutoff)
            empty = lengths == 0  # e.g. only characters the tokenizer's normaliser drops
            for _ in range(int(empty.sum())):
                tally.reject("no_tokens")
            pack.splits.add_flat(held[~empty], flat, lengths[~empty])
            n_heldout += int(held[~empty].sum())
            n_train += int((~empty).sum()) - int(held[~empty].sum())
            fault_point("ingest.batch")
            bar.advance(len(lengths), f"{pack.splits.tokens:,} tokens")
    return n_train, n_heldout


def _spooled_texts(text_file: Any, hash_file: Any, batch_docs: int) -> Iterator[tuple[list[str], bytes]]:
    """``TextSpool``'s documents ``batch_docs`` at a time, with their hashes."""
    while texts := [line.rstrip("\n") for _, line in zip(range(batch_docs), text_file)]:
        yield texts, hash_file.read(HASH_BYTES * len(texts))


def tokenize_pack(pack: Packing, *, total: int, tally: Tally, reporter: Reporter) -> tuple[int, int]:
    """Pass 2 of a ``TextSpool``: tokenize its documents in batches and pack them; return (train,
    heldout) docs. The next batch is tokenized in a worker thread while this one is counted and packed."""
    n_train = n_heldout = 0
    started = time.perf_counter()
    with open(pack.spool.with_suffix(".txt"), encoding="utf-8", newline="\n") as text_file, \
            open(pack.spool.with_suffix(".hash"), "rb") as hash_file, \
            ThreadPoolExecutor(1, thread_name_prefix="incr-tokenize") as pool, \
            reporter.progress("tokenizing", total=total, unit="docs") as bar:
        batches = _spooled_texts(text_file, hash_file, pack.batch_docs)
        encode = _encoder(pack.tokenizer, with_spans=pack.splits.segmenter is not None)

        def ahead() -> tuple[list[str], bytes, Future] | None:
            batch = next(batches, None)
            return None if batch is None else (*batch, pool.submit(encode, batch[0]))

        current = ahead()
        while current is not None:
            texts, digests, encoded = current
            current = ahead()  # encodes while this batch is packed
            ids, offsets = encoded.result()
            pack.coverage.add(texts, ids, offsets)
            held_out = _held_out(digests, pack.cutoff)
            docs = []
            for i, doc in enumerate(ids):
                if not doc:  # e.g. only characters the tokenizer's normaliser drops
                    tally.reject("no_tokens")
                else:
                    docs.append((bool(held_out[i]), doc, texts[i], offsets[i]))
            pack.splits.add(docs)
            held = sum(d[0] for d in docs)
            n_train += len(docs) - held
            n_heldout += held
            fault_point("ingest.batch")
            rate = pack.splits.tokens / max(time.perf_counter() - started, 1e-9)
            bar.advance(len(texts), f"{rate:,.0f} tokens/s")
    return n_train, n_heldout
