"""The dedup index: a sqlite table of the 16-byte hash of every document kept, so a document is kept
once per line whatever increment brings it; the held-out split is decided by the same hash."""

from __future__ import annotations

import hashlib
import heapq
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from incr_cli.errors import DiskFull, IntegrityError
from incr_cli.store.diskspace import is_disk_full
from incr_cli.store.workspace import Workspace

DOC_HASHES = "doc_hashes.bin"  # 16-byte hash of every kept document, in order: the index can be rebuilt from it
_SQL_CHUNK = 500  # bound variables per query, well under SQLite's limit


def doc_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the cleaned text: the dedup key and the source of the held-out split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def hash_unit(digest: bytes) -> float:
    """Map a hash to [0, 1) (its first 8 bytes as a big-endian fraction)."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


class HeldOutCutoff:
    """The held-out cutoff of documents streaming past, in memory bounded by ``min_docs`` (not by
    their number): documents with ``unit < cutoff()`` are held out.

    ``cutoff()`` is ``fraction``, raised to just above the ``min_docs``-th smallest unit when that holds
    out too few documents and there are at least ``2 * min_docs`` of them."""

    def __init__(self, fraction: float, min_docs: int):
        self.fraction, self.min_docs = fraction, min_docs
        self.n = self.below = 0
        self._smallest: list[float] = []  # the min_docs smallest units so far, negated (a max-heap)

    def add(self, unit: float) -> None:
        self.n += 1
        self.below += unit < self.fraction
        if len(self._smallest) < self.min_docs:
            heapq.heappush(self._smallest, -unit)
        elif self.min_docs > 0 and unit < -self._smallest[0]:
            heapq.heapreplace(self._smallest, -unit)

    def cutoff(self) -> float:
        if self.min_docs <= 0 or self.n < 2 * self.min_docs or self.below >= self.min_docs:
            return float(self.fraction)
        return float(np.nextafter(-self._smallest[0], 1.0))  # just above the min_docs-th smallest


# ----------------------------------------------------------------------------- the dedup index


def open_index(ws: Workspace) -> sqlite3.Connection:
    """The workspace's dedup index, created on first use. Autocommit: callers open transactions.

    An unreadable index is an IntegrityError; a missing one is rebuilt by ``recover_index`` from the
    increments' ``doc_hashes.bin``, so the index is only ever a cache of what data/ holds.
    """
    ws.data.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(ws.index_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for an ingest
        conn.execute("PRAGMA synchronous=FULL")  # the commit must be on disk before the folder rename
        conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS documents(hash BLOB PRIMARY KEY, increment TEXT NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS sources(sha256 TEXT NOT NULL, increment TEXT NOT NULL, reader TEXT NOT NULL DEFAULT '');
            CREATE INDEX IF NOT EXISTS sources_sha256 ON sources(sha256);
            -- increments with rows here: recovery compares it with data/ without scanning millions of hashes
            CREATE TABLE IF NOT EXISTS increments(id TEXT PRIMARY KEY);
            """
        )
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_disk_full(exc, ws.data):
            raise DiskFull("the dedup index", ws.index_path) from exc
        raise IntegrityError(f"{ws.index_path}: the dedup index cannot be read ({exc}); move it away and rerun: "
                             f"it is rebuilt from the increments' {DOC_HASHES}") from None
    return conn


def recover_index(ws: Workspace, conn: sqlite3.Connection | None = None) -> tuple[list[str], list[str]]:
    """Make the index match data/ (the lock is held): return (increments removed, increments added).

    Rows of an increment whose folder does not exist are deleted (a run killed between the index
    commit and the folder rename); an increment folder the index lacks (a deleted index) is added
    back from its ``doc_hashes.bin`` and manifest.
    """
    own = conn is None
    conn = conn or open_index(ws)
    try:
        on_disk = ws.increments()
        recorded = {row[0] for row in conn.execute("SELECT id FROM increments")}
        recorded |= {row[0] for row in conn.execute("SELECT DISTINCT increment FROM sources")}
        gone = sorted(recorded - set(on_disk))
        missing = [inc for inc in on_disk if inc not in recorded]
        if gone or missing:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for inc in gone:  # a full scan of documents, but only after a crash
                    conn.execute("DELETE FROM documents WHERE increment = ?", (inc,))
                    conn.execute("DELETE FROM sources WHERE increment = ?", (inc,))
                    conn.execute("DELETE FROM increments WHERE id = ?", (inc,))
                for inc in missing:
                    _index_increment(ws, conn, inc)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return gone, missing
    finally:
        if own:
            conn.close()


def _index_increment(ws: Workspace, conn: sqlite3.Connection, inc: str) -> None:
    manifest = ws.increment_manifest(inc)
    path = ws.increment_dir(inc) / DOC_HASHES
    if not path.is_file():
        raise IntegrityError(f"{inc}: {DOC_HASHES} is missing, so the dedup index cannot be rebuilt; "
                             f"restore it or remove {ws.increment_dir(inc)}")
    with open(path, "rb") as f:
        while block := f.read(16 * 65536):
            conn.executemany("INSERT OR IGNORE INTO documents(hash, increment) VALUES (?, ?)",
                             ((block[i:i + 16], inc) for i in range(0, len(block), 16)))
    conn.executemany("INSERT INTO sources(sha256, increment, reader) VALUES (?, ?, ?)",
                     [(s["sha256"], inc, s.get("reader", "")) for s in manifest.get("sources", [])])
    conn.execute("INSERT INTO increments(id) VALUES (?)", (inc,))


def chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def lookup(conn: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (whose ``{marks}`` is an IN list) for ``keys``, queried in bounded chunks."""
    rows: list[tuple[Any, ...]] = []
    for chunk in chunks(keys, _SQL_CHUNK):
        rows += conn.execute(sql.format(marks=",".join("?" * len(chunk))), tuple(chunk)).fetchall()
    return rows
