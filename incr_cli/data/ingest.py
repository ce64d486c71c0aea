"""Ingest: text files -> one data increment ``data/dNNNN-NAME/`` of packed token shards.

Two streaming passes, memory bounded whatever the input size:

1. read (``readers``), clean (NFC, control characters dropped, whitespace collapsed), cut over-long
   documents, drop too-short ones, and drop exact duplicates against the workspace-wide index
   ``data/index.sqlite`` (which also catches duplicates within this ingest). Kept documents are spooled
   to a file in the staging folder with their hash.
2. choose the held-out cutoff (which needs the number of kept documents, hence the spool), then
   tokenize the spool in batches with the workspace's fast tokenizer and pack it into
   ``train.bin`` / ``heldout.bin``.

A document is held out when its hash, read as a number in [0, 1), falls below the cutoff: the split
depends only on the text, so it is the same on every run. The cutoff is ``data.heldout_fraction``,
raised just enough to hold out ``data.heldout_min_docs`` documents when the increment has at least
twice as many.

Crash safety: the folder is written under ``staging/`` and renamed into place at the end; the new
hashes go into the index in one transaction committed just before the rename. Every ingest first
deletes index rows of increments whose folder does not exist (left by a run killed between the commit
and the rename), so a killed ingest leaves no trace and a rerun ingests exactly the same documents.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from incr_cli.config.recipe import Recipe
from incr_cli.data import readers
from incr_cli.data.clean import clean_text
from incr_cli.data.coverage import Coverage, check_coverage
from incr_cli.data.dedup import (
    DOC_HASHES,
    HeldOutCutoff,
    doc_hash,
    hash_unit,
    lookup,
    open_index,
    recover_index,
)
from incr_cli.data.packing import special_ids, token_dtype
from incr_cli.data.readers import FORMATS, ReadState, SourceFile, Tally
from incr_cli.data.segment import WORDS_SUFFIX, ChineseWords, has_cjk
from incr_cli.data.spool import Packing, Splits, TextSpool, TokenSpool, pack_tokens, tokenize_pack
from incr_cli.errors import InputError, UsageError, clip, shown
from incr_cli.faults import fault_point
from incr_cli.model import vocab
from incr_cli.model.tokenizer import tokenizer_sha256
from incr_cli.progress import Quiet, Reporter
from incr_cli.store.diskspace import disk_writes
from incr_cli.store.files import sha256_file
from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

BATCH_DOCS = 1000  # the default of data.batch_docs: documents per tokenizer call and per index round trip
# Reasons for which a file gave no text at all; when every file has one of these, it is an input error.
STDIN_CHUNK = 1 << 20  # standard input is copied a MiB at a time: memory stays bounded
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_UNREADABLE = {"missing", "unreadable", "symlink_loop", "not_a_file", "binary", "hidden", "no_train_split"}


# ----------------------------------------------------------------------------- result


@dataclass
class IngestResult:
    """What an ingest did. ``increment`` is None when nothing was written (``message`` says why)."""

    increment: str | None
    message: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    documents: dict[str, Any] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)  # reason -> {count, examples}
    duplicates_in: dict[str, int] = field(default_factory=dict)  # earlier increment -> duplicates found there
    bytes_read: int = 0
    seconds: float = 0.0
    unknown: dict[str, Any] = field(default_factory=dict)  # coverage.Coverage.to_dict() of the increment
    segmenter: str | None = None  # what gave the Chinese word boundaries (segment.py), if any
    vocab: dict[str, Any] = field(default_factory=dict)  # vocabulary growth: candidates, added words, tokens
    warnings: list[str] = field(default_factory=list)  # input read as asked that may be meant otherwise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NothingNew(Exception):
    """Raised inside the staged folder to discard it when no document survives."""


# ----------------------------------------------------------------------------- the two passes


@dataclass
class _Pass1:
    kept: int = 0
    duplicate: int = 0
    cut: int = 0
    duplicates_in: Counter = field(default_factory=Counter)
    split: HeldOutCutoff | None = None  # the kept documents' hash units, streamed into the held-out cutoff
    sources: list[dict[str, Any]] = field(default_factory=list)
    bytes_read: int = 0
    raw_docs: int = 0
    warned: int = 0  # how many of the reader's warnings were shown


def _read_clean_dedup(job: _Job, files: list[tuple[SourceFile, str]], out: _Pass1, conn: sqlite3.Connection,
                      sink: TextSpool | TokenSpool, tally: Tally) -> None:
    """Pass 1: stream documents, clean, dedup against the index (inserting new hashes, uncommitted).

    Kept documents go to ``sink`` (``spool.py``: as text, or tokenized on the way) and their hashes to
    the spool's .hash file; the counts go to ``out``.
    """
    increment, fmt, text_field, reporter = job.increment, job.fmt, job.text_field, job.reporter
    max_chars, min_chars = job.recipe.data.max_doc_chars, job.recipe.data.min_doc_chars
    batch: list[tuple[str, bytes, bool]] = []
    batch_docs = job.recipe.data.batch_docs
    out.split = HeldOutCutoff(job.recipe.data.heldout_fraction, job.recipe.data.heldout_min_docs)

    def flush() -> None:
        if batch:
            _flush_batch(batch, out, conn, increment, sink, hash_file)

    total_kb = sum(src.size for src, _ in files) // 1024  # whole units: progress bars count integers
    shown = 0  # bytes of input the bar has been moved by
    with open(sink.path.with_suffix(".hash"), "wb") as hash_file, \
            reporter.progress("reading", total=total_kb, unit="KB") as bar:
        for src, sha in files:
            state = ReadState()
            got_text = False
            for raw, cut in readers.read_documents(src, fmt, text_field, max_chars, tally, state):
                got_text = True
                out.raw_docs += 1
                text = clean_text(raw)
                if len(text) > max_chars:
                    text, cut = text[:max_chars].rstrip(), True
                if len(text) < min_chars:
                    tally.reject("too_short")
                    continue
                batch.append((text, doc_hash(text), cut))
                if len(batch) >= batch_docs:
                    flush()
                    shown = _advance(bar, shown, out.bytes_read + state.done, out)
            out.bytes_read += src.size
            flush()  # before the bar moves: its "new docs" count then includes this file's last batch
            shown = _advance(bar, shown, out.bytes_read, out)
            for warning in tally.warnings[out.warned:]:
                reporter.warn(warning)
            out.warned = len(tally.warnings)
            if state.skipped is None or got_text:  # a .gz broken midway still gave documents
                resolved = readers.resolve_format(src.path, fmt, src.real)
                out.sources.append({"path": src.path, "sha256": sha, "bytes": src.size,
                                    "reader": _reader_id(resolved, text_field), "format": resolved,
                                    "text_field": text_field if resolved in FIELD_FORMATS else None})


def _flush_batch(batch: list[tuple[str, bytes, bool]], out: _Pass1, conn: sqlite3.Connection, increment: str,
                 sink: TextSpool | TokenSpool, hash_file: Any) -> None:
    """Dedup ``batch`` (text, hash, cut) within itself and against the index; hand the kept ones to
    ``sink`` and their hashes to ``hash_file``, count every document in ``out``, and empty ``batch``."""
    unique: dict[bytes, tuple[str, bool]] = {}
    for text, digest, cut in batch:
        if digest in unique:
            out.duplicate += 1
        else:
            unique[digest] = (text, cut)
    hashes = list(unique)
    known = dict(lookup(conn, "SELECT hash, increment FROM documents WHERE hash IN ({marks})", hashes))
    conn.executemany("INSERT INTO documents(hash, increment) VALUES (?, ?)",
                     [(h, increment) for h in hashes if h not in known])
    lines = []
    for digest, (text, cut) in unique.items():
        if digest in known:
            out.duplicate += 1
            if known[digest] != increment:  # not a repeat within this ingest
                out.duplicates_in[known[digest]] += 1
            continue
        out.kept += 1
        out.cut += cut
        out.split.add(hash_unit(digest))
        lines.append(text)
        hash_file.write(digest)
    if lines:
        sink.add(lines)
    batch.clear()


def _advance(bar: Any, shown: int, done: int, out: _Pass1) -> int:
    """Move the reading bar by whole KB; return the bytes now shown."""
    kb = (done - shown) // 1024
    bar.advance(kb, f"{out.kept:,} new docs, {out.duplicate:,} duplicates")
    return shown + kb * 1024


def _segmenter(recipe: Recipe, spool: Path) -> ChineseWords | None:
    """jieba when ``masking.whole_word`` is on and the spooled text holds Chinese, else None."""
    if not recipe.masking.whole_word:
        return None
    with open(spool.with_suffix(".txt"), encoding="utf-8", newline="\n") as text_file:
        while block := text_file.read(1 << 20):
            if has_cjk(block):
                return ChineseWords()
    return None


FIELD_FORMATS = ("jsonl", "csv", "tsv", "parquet", "arrow")  # the formats that read one field of each record


def reader_id(src: SourceFile, fmt: str, text_field: str) -> str:
    """How a file was read ("lines", "paragraphs", "jsonl:FIELD", "csv:FIELD"): the same file read
    another way is new input."""
    return _reader_id(readers.resolve_format(src.path, fmt, src.real), text_field)


def _reader_id(resolved: str, text_field: str) -> str:
    return f"{resolved}:{text_field}" if resolved in FIELD_FORMATS else resolved


def _skipped_summary(tally: Tally) -> dict[str, dict[str, Any]]:
    return {reason: {"count": n, "examples": tally.examples.get(reason, [])} for reason, n in sorted(tally.files.items())}


def _describe_skips(tally: Tally) -> str:
    """ "a.bin, b.bin and 3 more (binary); x.txt (missing)" """
    parts = []
    for reason, n in sorted(tally.files.items()):
        shown = tally.examples.get(reason, [])[:3]
        more = f" and {n - len(shown)} more" if n > len(shown) else ""
        parts.append(f"{', '.join(shown)}{more} ({reason})")
    return "; ".join(parts)


def _name_paths(paths: list[str]) -> str:
    return " ".join(map(clip, paths[:3])) + (f" (and {len(paths) - 3} more)" if len(paths) > 3 else "")


def _warn_skips(reporter: Reporter, tally: Tally) -> None:
    if tally.files:
        reporter.warn(f"skipped {sum(tally.files.values())} path(s): {_describe_skips(tally)}")


def _documents(p1: _Pass1 | None, tally: Tally, n_train: int = 0, n_heldout: int = 0) -> dict[str, Any]:
    return {"kept": n_train + n_heldout, "train": n_train, "heldout": n_heldout,
            "duplicate": p1.duplicate if p1 else 0, "rejected": dict(sorted(tally.docs.items())),
            "rejected_at": dict(sorted(tally.doc_examples.items())), "cut_long": p1.cut if p1 else 0}


def _nothing_new_message(p1: _Pass1) -> str:
    where = ", ".join(inc for inc, _ in p1.duplicates_in.most_common())
    return f"nothing new: all {p1.duplicate:,} documents are already in {where or 'this ingest'}"


# ----------------------------------------------------------------------------- vocabulary growth


class _DryRun(Exception):
    """Raised inside the staged folder after the candidates are known: nothing is kept."""


@dataclass
class _Growing:
    """An ingest's vocabulary growth: how many words were asked for, and what happened (the report)."""

    wanted: int
    dry_run: bool
    revision: vocab.Revision | None  # the revision ingest starts from (None: a tokenizer passed in)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestOptions:
    """How ``ingest`` reads and what it may do: the increment's ``name`` (default: from the first
    path), the input format and the field or column holding the text, whether text the tokenizer
    cannot represent may pass ``data.unknown_max``, how many new words to add as tokens
    (``extend_vocab``; default ``vocab.max_new_tokens``), and ``dry_run``: report those words only."""

    name: str | None = None
    fmt: str = "auto"
    text_field: str = "text"
    allow_unknown: bool = False
    extend_vocab: int | None = None
    dry_run: bool = False


@dataclass
class _Job:
    """One ingest: where it writes, what it reads and how; shared by its two passes."""

    ws: Workspace
    increment: str
    paths: list[str]
    recipe: Recipe
    tokenizer: Any
    reporter: Reporter
    options: IngestOptions
    grow: _Growing
    started: float = field(default_factory=time.perf_counter)
    stdin: str | None = None  # the spooled copy of standard input, read for the path "-"

    @property
    def fmt(self) -> str:
        return self.options.fmt

    @property
    def text_field(self) -> str:
        return self.options.text_field

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _count_words(spool: Path, cutoff: float, tokenizer: Any) -> vocab.WordCounts:
    """The spooled documents' words, per split (the held-out ones never choose a token)."""
    counts = vocab.WordCounts()
    with open(spool.with_suffix(".txt"), encoding="utf-8", newline="\n") as text_file, \
            open(spool.with_suffix(".hash"), "rb") as hash_file:
        for line in text_file:
            counts.add(tokenizer, line.rstrip("\n"), hash_unit(hash_file.read(16)) < cutoff)
    return counts


def _grow_tokenizer(job: _Job, tmp: Path, spool: Path, cutoff: float) -> Any:
    """The tokenizer this increment is tokenized with: the job's, or a revision of it grown by the
    increment's most frequent multi-piece words (stored in ``tmp/tokenizer``). Fills ``grow.report``;
    raises _DryRun after the report on a dry run."""
    tokenizer, recipe, grow, reporter = job.tokenizer, job.recipe, job.grow, job.reporter
    counts = _count_words(spool, cutoff, tokenizer)
    found = vocab.candidates(counts, tokenizer, recipe.vocab)
    chosen = found[:grow.wanted]
    grow.report = {"requested": grow.wanted, "candidates": len(found), "added": [c.to_dict() for c in chosen],
                   "min_frequency": recipe.vocab.min_frequency, "min_pieces": recipe.vocab.min_pieces}
    if grow.dry_run:
        raise _DryRun()
    if len(found) < grow.wanted:
        reporter.warn(f"--extend-vocab {grow.wanted}: only {len(found)} word(s) occur at least "
                      f"{recipe.vocab.min_frequency} times and are cut into {recipe.vocab.min_pieces}+ pieces; "
                      f"adding {len(found)}")
    if not chosen:
        return tokenizer
    start = len(tokenizer)
    grown = vocab.extend_tokenizer(tokenizer, [c.token for c in chosen], tmp / vocab.TOKENIZER_DIR)
    parent = grow.revision.lineage if grow.revision else [tokenizer_sha256(tokenizer)]
    sha = tokenizer_sha256(grown)
    grow.report.update(
        sha256=sha, lineage=[*parent, sha], revision=len(parent), base_size=start, size=len(grown),
        added=[{**c.to_dict(), "id": start + i} for i, c in enumerate(chosen)],
        tokens=vocab.token_counts(counts, tokenizer, grown))
    return grown


# ----------------------------------------------------------------------------- the entry point


def ingest(ws: Workspace, paths: Iterable[str], *, recipe: Recipe, options: IngestOptions = IngestOptions(),
           reporter: Reporter | None = None, tokenizer: Any = None) -> IngestResult:
    """Ingest ``paths`` (files, directories, globs) as the next increment of ``ws``, read as ``options``
    say. The caller holds the lock.

    Returns an ``IngestResult`` whose ``increment`` is None when nothing new was found (nothing is
    written then). Raises ``InputError`` when no path gave any readable text or the tokenizer cannot
    represent it (see ``coverage``; ``options.allow_unknown`` lifts the data.unknown_max limit),
    ``UsageError`` for a bad name or format, or for ``options.extend_vocab`` on a tokenizer that cannot grow.

    ``tokenizer`` defaults to the line's newest tokenizer revision (``vocab.line_tokenizer``).
    ``options.extend_vocab`` (default ``vocab.max_new_tokens``) adds up to that many new words as tokens
    (``vocab.py``); ``options.dry_run`` then reports the candidates and writes nothing.
    """
    name, fmt, extend_vocab, dry_run = options.name, options.fmt, options.extend_vocab, options.dry_run
    reporter = reporter or Quiet()
    paths = [str(p) for p in paths]
    if not paths:
        raise UsageError("ingest needs at least one PATH (a file, a directory or a glob)")
    urls = [p for p in paths if _URL.match(p)]
    if urls:
        raise InputError(f"{shown(urls[0])} is a URL: incr ingest reads local files; download it first "
                         "(e.g. curl -LO URL) and pass the file")
    if fmt not in FORMATS:
        raise UsageError(f"--format {shown(fmt)}: use one of {', '.join(FORMATS)}")
    increment = ws.next_increment(name or readers.default_name(paths[0]))
    line = vocab.line_tokenizer(ws)
    tokenizer, revision = line if tokenizer is None else (tokenizer, None)
    grow = _Growing(recipe.vocab.max_new_tokens if extend_vocab is None else extend_vocab, dry_run, revision)
    if grow.wanted:
        vocab.growable_kind(tokenizer)  # refuse before reading anything
    elif dry_run:
        raise UsageError("--dry-run shows the words --extend-vocab N would add; give --extend-vocab N "
                         "(or vocab.max_new_tokens) with it")

    ws.clean_staging()
    job = _Job(ws, increment, paths, recipe, tokenizer, reporter, options, grow)
    with disk_writes(f"increment {increment}", ws.data), _stdin_spooled(job):
        return _ingest_into(job)


@contextlib.contextmanager
def _stdin_spooled(job: _Job) -> Iterator[None]:
    """For the path "-": standard input copied, streamed, into a file under staging (removed after),
    so it is hashed, deduplicated and recorded like any file; its source reads as "-"."""
    if "-" not in job.paths:
        yield
        return
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("the path - reads standard input, which is a terminal here: pipe the text in "
                         "(e.g. zcat dump.gz | incr ingest WS - --name NAME)")
    spool = job.ws.staging / f"stdin-{uuid.uuid4().hex[:8]}"
    job.ws.staging.mkdir(parents=True, exist_ok=True)
    try:
        with open(spool, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, STDIN_CHUNK)
        job.stdin = str(spool)
        yield
    finally:
        spool.unlink(missing_ok=True)


def _ingest_into(job: _Job) -> IngestResult:
    ws, reporter, grow = job.ws, job.reporter, job.grow
    conn = open_index(ws)
    try:
        gone, added = recover_index(ws, conn)
        if gone:
            reporter.warn(f"removed index rows of increments that were never completed: {', '.join(gone)}")
        if added:
            reporter.warn(f"rebuilt the dedup index entries of {', '.join(added)} from their {DOC_HASHES}")
        tally = Tally()
        files = _find_sources(job.paths, tally, job.stdin)
        done = _already_ingested(conn, files, job.fmt, job.text_field)
        if done:
            _warn_skips(reporter, tally)
            message = f"nothing new: all {done[0]} source file(s) were already ingested in {done[1]}"
            return IngestResult(None, message, documents=_documents(None, tally), skipped=_skipped_summary(tally),
                                seconds=job.seconds())
        p1 = _Pass1()
        try:
            manifest = _write_increment(job, conn, files, p1, tally)
        except _DryRun:
            return IngestResult(None, _dry_run_message(grow.report), sources=p1.sources,
                                documents=_documents(p1, tally), seconds=job.seconds(), vocab=grow.report)
        except _NothingNew:
            return IngestResult(None, _nothing_written(p1, tally, job.paths), sources=p1.sources,
                                documents=_documents(p1, tally), skipped=_skipped_summary(tally), warnings=tally.warnings,
                                duplicates_in=dict(p1.duplicates_in), bytes_read=p1.bytes_read, seconds=job.seconds())
    finally:
        conn.close()

    docs, seqs, toks = manifest["documents"], manifest["sequences"], manifest["tokens"]
    message = (f"{job.increment}: {docs['kept']:,} documents ({docs['heldout']:,} held out), "
               f"{seqs['train'] + seqs['heldout']:,} sequences, {toks['train'] + toks['heldout']:,} tokens")
    return IngestResult(job.increment, message, sources=p1.sources, documents=docs, sequences=seqs, tokens=toks,
                        skipped=manifest["skipped"], duplicates_in=dict(p1.duplicates_in),
                        bytes_read=p1.bytes_read, seconds=job.seconds(),
                        unknown=manifest["unknown"], segmenter=(manifest.get("words") or {}).get("segmenter"),
                        vocab=manifest.get("vocab") or {}, warnings=tally.warnings)


def _find_sources(paths: list[str], tally: Tally, stdin: str | None = None) -> list[tuple[SourceFile, str]]:
    """The files to read with their sha256; InputError when there is none. ``stdin``: the file
    holding what standard input gave, read for the path "-"."""
    files = []
    for src in readers.expand_paths(paths, tally, stdin=stdin):
        try:
            files.append((src, sha256_file(src.real, opener=readers.open_binary)))
        except OSError as exc:
            tally.skip_file(src.path, readers.stat_reason(exc))
    if not files:
        raise InputError(f"nothing readable in {_name_paths(paths)}: {_describe_skips(tally) or 'no files'}")
    return files


def _already_ingested(conn: sqlite3.Connection, files: list[tuple[SourceFile, str]], fmt: str,
                      text_field: str) -> tuple[int, str] | None:
    """(files, increments) when every non-empty file was ingested before, read the same way; else None."""
    rows = lookup(conn, "SELECT sha256, reader, increment FROM sources WHERE sha256 IN ({marks})",
                   [sha for _, sha in files])
    known = {(sha, reader): inc for sha, reader, inc in rows}
    wanted = [(sha, reader_id(src, fmt, text_field)) for src, sha in files if src.size > 0]
    if not wanted or not all(key in known for key in wanted):
        return None
    return len(wanted), ", ".join(sorted({known[key] for key in wanted}))


def _write_increment(job: _Job, conn: sqlite3.Connection, files: list[tuple[SourceFile, str]], p1: _Pass1,
                     tally: Tally) -> dict[str, Any]:
    """Both passes inside a staged folder and one index transaction; return the sealed manifest.

    Fills ``p1`` as it goes (the caller reports from it); raises ``_NothingNew`` having written nothing
    (``_DryRun`` after choosing the words of a vocabulary dry run).
    """
    ws, increment = job.ws, job.increment
    conn.execute("BEGIN IMMEDIATE")
    try:
        with ws.staged_folder(ws.increment_dir(increment)) as tmp:
            manifest = _both_passes(job, conn, files, p1, tally, tmp)
            conn.execute("COMMIT")  # before the rename: recovery removes the rows if the rename never happens
            fault_point("ingest.before_rename")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return manifest


def _both_passes(job: _Job, conn: sqlite3.Connection, files: list[tuple[SourceFile, str]], p1: _Pass1,
                 tally: Tally, tmp: Path) -> dict[str, Any]:
    """Pass 1 into a spool (``spool.py``: token ids tokenized on the way, or text when the tokenizer or the
    segmentation is only known after it), the held-out cutoff, pass 2 into the splits; -> the manifest."""
    recipe, tokenizer, reporter, grow = job.recipe, job.tokenizer, job.reporter, job.grow
    spool = tmp / ".spool"
    tokens_now = not grow.wanted and not recipe.masking.whole_word
    sink = (TokenSpool(spool, tokenizer, Coverage(tokenizer.unk_token_id), token_dtype(len(tokenizer))) if tokens_now
            else TextSpool(spool))
    try:
        _read_clean_dedup(job, files, p1, conn, sink, tally)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    _warn_skips(reporter, tally)
    if p1.kept == 0:
        raise _NothingNew()
    cutoff = p1.split.cutoff()
    if grow.wanted:
        tokenizer = _grow_tokenizer(job, tmp, spool, cutoff)
    # counted during pass 1 by a token spool, else during pass 2 with the final tokenizer
    coverage = sink.coverage if isinstance(sink, TokenSpool) else Coverage(tokenizer.unk_token_id)
    dtype = token_dtype(len(tokenizer))
    segmenter = None if tokens_now else _segmenter(recipe, spool)
    cls_id, sep_id, pad_id = special_ids(tokenizer)
    splits = Splits(tmp, recipe.model.max_seq_len, segmenter, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, dtype=dtype)
    try:
        pack = Packing(spool, cutoff, tokenizer, splits, coverage, recipe.data.batch_docs)
        counts = (pack_tokens(pack, dtype, tally=tally, reporter=reporter, total=p1.kept) if tokens_now else
                  tokenize_pack(pack, total=p1.kept, tally=tally, reporter=reporter))
    finally:
        splits.close()
    if sum(counts) == 0:
        raise _NothingNew()
    check_coverage(coverage, job.increment, warn_above=recipe.data.unknown_warn, refuse_above=recipe.data.unknown_max,
                   allow_unknown=job.options.allow_unknown, reporter=reporter)
    sink.path.unlink()
    spool.with_suffix(".hash").rename(tmp / DOC_HASHES)
    _record_sources(conn, job.increment, p1)
    return seal_folder(tmp, base_manifest(
        "increment", id=job.increment, name=job.increment.split("-", 1)[1], seq_len=recipe.model.max_seq_len,
        dtype=dtype, pad_id=pad_id, cls_id=cls_id, sep_id=sep_id, **_tokenizer_fields(tokenizer, grow),
        reader={"format": job.fmt, "text_field": job.text_field}, sources=p1.sources,
        documents=_documents(p1, tally, *counts), heldout_cutoff=cutoff,
        sequences={"train": splits.train.rows, "heldout": splits.heldout.rows},
        tokens={"train": splits.train.tokens, "heldout": splits.heldout.tokens},
        doc_hashes={"file": DOC_HASHES, "hash": "blake2b-128"}, skipped=_skipped_summary(tally),
        unknown=coverage.to_dict(), words={"segmenter": segmenter.name, "suffix": WORDS_SUFFIX} if segmenter else None,
    ))


def _record_sources(conn: sqlite3.Connection, increment: str, p1: _Pass1) -> None:
    conn.executemany("INSERT INTO sources(sha256, increment, reader) VALUES (?, ?, ?)",
                     [(s["sha256"], increment, s["reader"]) for s in p1.sources])
    conn.execute("INSERT INTO increments(id) VALUES (?)", (increment,))


def _tokenizer_fields(tokenizer: Any, grow: _Growing) -> dict[str, Any]:
    """The manifest's record of the tokenizer the ids come from: vocabulary size, sha256, the lineage
    of revisions it extends (vocab.py), and what this ingest added (``vocab``; None when nothing)."""
    grown = bool(grow.report.get("sha256"))
    lineage = (grow.report["lineage"] if grown else grow.revision.lineage if grow.revision
               else [tokenizer_sha256(tokenizer)])
    return {"vocab_size": len(tokenizer), "tokenizer_sha256": lineage[-1], "tokenizer_lineage": lineage,
            "vocab": grow.report if grown else None}


def _dry_run_message(report: dict[str, Any]) -> str:
    n, found = len(report["added"]), report["candidates"]
    return f"dry run: {n} of {found} candidate word(s) would be added to the vocabulary; nothing was written"


def _nothing_written(p1: _Pass1, tally: Tally, paths: list[str]) -> str:
    """Why no increment was written; InputError when nothing was readable or every document was rejected."""
    if not p1.sources and set(tally.files) & _UNREADABLE:
        raise InputError(f"nothing readable in {_name_paths(paths)}: {_describe_skips(tally)}")
    if p1.duplicate:
        return _nothing_new_message(p1)
    if p1.raw_docs or tally.docs:  # bad UTF-8 or JSON lines are rejected by the reader: not in raw_docs
        hint = ("; check --format and --text-field"
                if set(tally.docs) & {"malformed_json", "missing_field", "malformed_csv"} else "")
        if tally.fields_seen:
            found = ", ".join(name for name, _ in tally.fields_seen.most_common(5))
            hint = f"; the records' text fields are {found}: choose one with --text-field"
        elif "not_an_object" in tally.docs:
            hint = "; JSON Lines needs one object per line ({\"text\": ...}), not an array: check --format"
        raise InputError(f"nothing usable in {_name_paths(paths)}: every document read was rejected "
                         f"({_rejections(tally)}){hint}")
    return f"nothing to ingest: the input holds no documents ({_describe_skips(tally) or 'blank lines only'})"


def _rejections(tally: Tally) -> str:
    return ", ".join(f"{r}: {n:,}" for r, n in sorted(tally.docs.items())) or "all were blank"
