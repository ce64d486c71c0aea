"""Reading token shards and sampling training batches of new and replayed sequences.

An increment's ``train.bin`` / ``heldout.bin`` are raw (n, seq_len) arrays opened as memmaps, so
opening one costs nothing; the sampler reads a batch's rows from the files with ``pread`` (see
``_Pool``), so a long run over a large history keeps neither the history mapped nor its pages read
ahead. The sampler is a pure function of
(seed, batch index): a batch's new rows are the next slice of a seeded permutation of the new
sequences (a fresh permutation per epoch), its replay rows are drawn with replacement from the earlier
increments of the lineage, split over them by ``replay.split`` (``replay_shares``). Resuming is therefore just "continue at batch b", and
every DDP rank computes the same global batch and keeps its own slice of it. Mapping a global row
index to (increment, row) is a ``searchsorted`` over cumulative sizes, so the cost grows with the
number of increments only through that O(#increments) table.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from incr_cli.data.segment import WORDS_SUFFIX
from incr_cli.errors import InputError, IntegrityError
from incr_cli.store.files import read_manifest, safe_relpath
from incr_cli.store.workspace import Workspace

# Separate streams of the sampler's seeded generators (any fixed, distinct numbers).
_STREAM_SUBSET, _STREAM_EPOCH, _STREAM_REPLAY = 101, 202, 303
REPLAY_SPLITS = ("size", "increment")


def replay_shares(sizes: list[int], split: str) -> np.ndarray:
    """(K,) share of the replayed rows each of K earlier increments gets, summing to 1 (all 0 when
    none has rows); an increment without training rows gets none.

    ``size``: a row is drawn uniformly from all earlier rows, so an increment's share is its share of
    the rows (a small or old increment fades as the line grows). ``increment``: every increment with
    rows the same share, 1 / K, whatever its size (each stays covered however many follow it).
    """
    sizes_ = np.asarray(sizes, dtype=np.float64)
    if split not in REPLAY_SPLITS:
        raise ValueError(f"replay.split: {split!r} is not one of {', '.join(REPLAY_SPLITS)}")
    weights = sizes_ if split == "size" else (sizes_ > 0).astype(np.float64)
    total = weights.sum()
    return weights / total if total > 0 else np.zeros_like(weights)


@dataclass
class IncrementShards:
    """One increment's token shards: train and heldout (n, seq_len) arrays (memmap or empty)."""

    id: str
    train: np.ndarray
    heldout: np.ndarray
    manifest: dict[str, Any] = field(repr=False)
    pad_id: int
    # (n, seq_len) uint8, 1 where a token continues the word before it (segment.py), when ingest segmented
    train_words: np.ndarray | None = None
    heldout_words: np.ndarray | None = None
    # the files behind ``train`` and ``train_words`` (the sampler reads their rows with pread; None: in memory)
    train_file: Path | None = None
    train_words_file: Path | None = None

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])


def _open_split(folder, name: str, manifest: dict[str, Any], words: bool = False) -> np.ndarray:
    """``folder/<name>.bin`` (``<name>.words.bin`` with ``words``) as a read-only (n, seq_len) array;
    n comes from the manifest."""
    seq_len = int(manifest["seq_len"])
    rows = int(manifest["sequences"][name])
    dtype = np.dtype("uint8" if words else manifest["dtype"])
    path = safe_relpath(folder, f"{name}{WORDS_SUFFIX}" if words else f"{name}.bin")
    expected = rows * seq_len * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"{folder.name}: file {path.name} is missing; remove {folder} and ingest again") from None
    if size != expected:
        raise IntegrityError(f"{folder.name}: {path.name} has {size} bytes, {rows} x {seq_len} {dtype} sequences "
                             f"need {expected}; remove {folder} and ingest again")
    if rows == 0:  # mmap cannot map an empty file
        return np.zeros((0, seq_len), dtype=dtype)
    return np.memmap(str(path), dtype=dtype, mode="r", shape=(rows, seq_len))  # a str: numpy resolves a Path (symlink walk)


def open_increment(ws: Workspace, increment_id: str, *, verify: bool = True) -> IncrementShards:
    """Open ``data/<increment_id>/``; ``verify`` checks every file against the manifest first."""
    folder = ws.increment_dir(increment_id)
    if not folder.is_dir():
        known = ", ".join(ws.increments()) or "none"
        raise IntegrityError(f"increment {increment_id} is missing from {ws.data}; known increments: {known}")
    manifest = ws.verify_increment(increment_id) if verify else read_manifest(folder)
    try:
        train = _open_split(folder, "train", manifest)
        heldout = _open_split(folder, "heldout", manifest)
        pad_id = int(manifest["pad_id"])
        segmented = bool(manifest.get("words"))
        words = [_open_split(folder, name, manifest, words=True) if segmented else None for name in ("train", "heldout")]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{folder / 'manifest.json'}: missing or bad field {exc}; remove {folder} "
                             "and ingest again") from None
    files = [safe_relpath(folder, "train.bin") if len(train) else None,
             safe_relpath(folder, f"train{WORDS_SUFFIX}") if segmented and len(train) else None]
    return IncrementShards(increment_id, train, heldout, manifest, pad_id, *words, *files)


def check_tokenizer(increment_id: str, manifest: dict[str, Any], tokenizer_sha: str | list[str], version: str,
                    remedy: str) -> None:
    """InputError when ``increment_id`` (its ``manifest``) was tokenized by another tokenizer than
    ``version``'s (``tokenizer_sha``, or the sha256 of every revision of it, ``vocab.py``): its ids mean
    other words to that model. ``remedy`` says what to do."""
    recorded = manifest.get("tokenizer_sha256")
    valid = [tokenizer_sha] if isinstance(tokenizer_sha, str) else tokenizer_sha
    if recorded and recorded not in valid:
        raise InputError(f"{increment_id} was tokenized with a different tokenizer than {version}'s; {remedy}")


class _Pool:
    """Several increments' train rows seen as one index space [0, total).

    Rows are read from their files with ``pread`` (``_RowFiles``), not through the memory map: a replay
    over a long history would otherwise leave every page it touched mapped into the process (its
    resident memory growing to the history's size) and read ahead around every random row."""

    def __init__(self, shards: list[IncrementShards]):
        self.shards = [s for s in shards if len(s.train)]
        sizes = np.array([len(s.train) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # (I + 1,)
        self.total = int(self.starts[-1])
        self.segmented = any(s.train_words is not None for s in self.shards)
        self.files = _RowFiles()
        # per increment, (rows, the file behind them or None) of the token ids and of the word bits
        self._sources = {False: [(s.train, s.train_file) for s in self.shards],
                         True: [(s.train_words, s.train_words_file) for s in self.shards]}

    def gather(self, index: np.ndarray, seq_len: int, words: bool = False) -> np.ndarray:
        """index (n,) int64 in [0, total) -> (n, seq_len) int64 rows, in the order given; with ``words``
        the rows' word-continuation bits instead (bool; all False for an increment without them)."""
        if len(index) == 0:
            return np.zeros((0, seq_len), dtype=bool if words else np.int64)
        which = np.searchsorted(self.starts, index, side="right") - 1  # (n,) increment of each row
        local = index - self.starts[which]  # (n,) row within its increment
        sources = self._sources[words]
        if all(path is not None for _, path in sources):  # one read per row, however many increments it spans
            rows = self.files.read([sources[i][1] for i in which.tolist()], local, seq_len, sources[0][0].dtype)
            return rows.astype(bool if words else np.int64)
        out = np.zeros((len(index), seq_len), dtype=bool if words else np.int64)
        for i in np.unique(which):  # arrays in memory (or without word bits): indexed per increment
            source = sources[i][0]
            if source is not None:
                sel = which == i
                out[sel] = self.files.rows(source, sources[i][1], local[sel])
        return out


class _RowFiles:
    """Rows of (n, T) arrays read from their files with ``os.preadv`` straight into the batch, the file
    descriptors kept open (at most ``MAX_OPEN``, least recently used closed first), readahead off."""

    MAX_OPEN = 256

    def __init__(self) -> None:
        self._fds: OrderedDict[Path, int] = OrderedDict()

    def rows(self, source: np.ndarray, path: Path | None, index: np.ndarray) -> np.ndarray:
        """``source[index]`` ((k,) int64 row numbers), read from ``path`` when given."""
        if path is None:
            return np.asarray(source[index])
        return self.read([path] * len(index), index, source.shape[1], source.dtype)

    def read(self, paths: list[Path], index: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
        """Row ``index[j]`` of the (n, width) ``dtype`` file ``paths[j]``, for each j -> (len(index), width)."""
        out = np.empty((len(index), width), dtype=dtype)
        row_bytes = width * out.itemsize
        view = out.view(np.uint8).reshape(len(index), row_bytes)
        for buffer, path, row in zip(view, paths, index.tolist()):
            if os.preadv(self._fd(path), [buffer], row * row_bytes) != row_bytes:
                raise IntegrityError(f"{path}: row {row} is past the end of the file; it changed since it was "
                                     "verified: run `incr verify WORKSPACE`")
        return out

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # a row is a few hundred bytes: no readahead
        while len(self._fds) >= self.MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


@dataclass
class Batch:
    """One rank's micro-batch: new_ids (n_new, T) and replay_ids (n_replay, T), int64 token ids."""

    new_ids: np.ndarray
    replay_ids: np.ndarray
    continues: np.ndarray | None = None  # (n_new + n_replay, T) bool word-continuation bits, when segmented

    @property
    def input_ids(self) -> np.ndarray:
        """(n_new + n_replay, T): new rows first, then replay rows."""
        return np.concatenate([self.new_ids, self.replay_ids], axis=0)


@dataclass(frozen=True)
class Draw:
    """How a sampler draws: ``n_new`` new and ``n_replay`` replayed rows per micro-batch and rank, its
    streams seeded by ``seed``; ``sample``: train on that many new rows only (drawn once, seeded);
    ``split``: how the replayed rows are spread over the earlier increments (``replay_shares``)."""

    n_new: int
    n_replay: int = 0
    seed: int = 0
    sample: int | None = None
    split: str = "size"


class BatchSampler:
    """Micro-batches of ``draw.n_new`` new and ``draw.n_replay`` replayed sequences per rank.

    Every rank draws the same global batch (``world_size`` times larger) and keeps slice ``rank`` of
    its new part and of its replay part, so all ranks see the same new/replay mix. State: the batch index.
    """

    def __init__(self, new: list[IncrementShards], replay: list[IncrementShards], draw: Draw, *, rank: int = 0,
                 world_size: int = 1):
        n_new, n_replay, seed, sample, split = draw.n_new, draw.n_replay, draw.seed, draw.sample, draw.split
        lengths = {s.seq_len for s in [*new, *replay]}
        if len(lengths) > 1:
            detail = ", ".join(f"{s.id}={s.seq_len}" for s in [*new, *replay])
            raise InputError(f"increments have different sequence lengths ({detail}); train them in separate "
                             "lines or ingest again with one model.max_seq_len")
        self.seq_len = lengths.pop() if lengths else 0
        self.new_pool, self.replay_pool = _Pool(new), _Pool(replay)
        if self.new_pool.total == 0:
            raise InputError(f"the new increments ({', '.join(s.id for s in new) or 'none'}) hold no training "
                             "sequences; ingest more text")
        if n_replay and self.replay_pool.total == 0:
            raise InputError("replay asked for, but the earlier increments hold no training sequences")
        self.n_new, self.n_replay = n_new, n_replay
        self.split = split
        self.replay_shares = replay_shares([len(s.train) for s in self.replay_pool.shards], split)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.subset = None
        if sample is not None and sample < self.new_pool.total:
            rng = np.random.default_rng([seed, _STREAM_SUBSET])
            self.subset = np.sort(rng.choice(self.new_pool.total, size=sample, replace=False))
        self.n_new_sequences = self.new_pool.total if self.subset is None else len(self.subset)
        self.batch_index = 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_index = int(state["batch_index"])

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, _STREAM_EPOCH, epoch])
            self._epoch_cache = (epoch, rng.permutation(self.n_new_sequences))
        return self._epoch_cache[1]

    def new_indices(self, batch_index: int) -> np.ndarray:
        """(n_new * world_size,) global new-pool indices of global batch ``batch_index``."""
        size = self.n_new * self.world_size
        position = np.arange(batch_index * size, (batch_index + 1) * size, dtype=np.int64)
        epochs, offsets = np.divmod(position, self.n_new_sequences)
        out = np.empty(size, dtype=np.int64)
        for epoch in np.unique(epochs):  # at most a few epochs per batch
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))[offsets[sel]]
        return out if self.subset is None else self.subset[out]

    def replay_indices(self, batch_index: int) -> np.ndarray:
        """(n_replay * world_size,) replay-pool indices of global batch ``batch_index``.

        Rank r's slice is drawn from the stream of micro-batch ``batch_index * world_size + r``: the
        rows one process with ``world_size`` times the accumulation would draw for that micro-batch,
        so W ranks and one process (same global batch) train on the same rows."""
        if self.n_replay == 0:
            return np.zeros(0, dtype=np.int64)
        first = batch_index * self.world_size
        return np.concatenate([self._draw_replay(np.random.default_rng([self.seed, _STREAM_REPLAY, first + r]))
                               for r in range(self.world_size)])

    def _draw_replay(self, rng: np.random.Generator) -> np.ndarray:
        """``n_replay`` replay-pool indices: by size, uniform over all rows; else an increment by its
        share, then a row of it uniformly."""
        pool = self.replay_pool
        if self.split == "size":
            return rng.integers(0, pool.total, size=self.n_replay, dtype=np.int64)
        which = rng.choice(len(pool.shards), size=self.n_replay, p=self.replay_shares)
        sizes = pool.starts[1:] - pool.starts[:-1]
        return pool.starts[which] + rng.integers(0, sizes[which], dtype=np.int64)

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch; advances the position."""
        b = self.batch_index
        self.batch_index += 1
        new = self.new_indices(b)[self.rank * self.n_new:(self.rank + 1) * self.n_new]
        replay = self.replay_indices(b)[self.rank * self.n_replay:(self.rank + 1) * self.n_replay]
        batch = Batch(self.new_pool.gather(new, self.seq_len), self.replay_pool.gather(replay, self.seq_len))
        if self.new_pool.segmented or self.replay_pool.segmented:
            batch.continues = np.concatenate([self.new_pool.gather(new, self.seq_len, words=True),
                                              self.replay_pool.gather(replay, self.seq_len, words=True)])
        return batch


def split_batch_size(batch_size: int, ratio: float, has_replay: bool, on_top: bool = False) -> tuple[int, int]:
    """-> (n_new, n_replay) rows of a micro-batch when there is replay data: ``round(batch_size *
    ratio)`` of the batch replayed, always keeping at least one new row; ``on_top``: ``batch_size``
    new rows plus ``round(batch_size * ratio / (1 - ratio))`` replayed (at least one), so that the
    replayed rows are still ``ratio`` of the larger batch."""
    if not has_replay or ratio <= 0:
        return batch_size, 0
    if on_top:
        return batch_size, max(round(batch_size * ratio / (1.0 - ratio)), 1)
    n_replay = min(round(batch_size * ratio), batch_size - 1)
    return batch_size - n_replay, n_replay
