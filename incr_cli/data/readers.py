"""Input readers for ingest: expand paths, open plain or gzipped files, and stream raw documents.

Nothing here raises on bad input: every file or line that cannot be used is counted under a reason
(``Tally``) and reading goes on, so one bad file never loses the good ones.

Formats (``--format``):
- ``lines``: one document per line.
- ``paragraphs``: documents separated by blank lines (the lines of a paragraph are joined).
- ``jsonl``: one JSON object per line; the document is its ``text_field`` (a string).
- ``csv`` / ``tsv``: a header row, then one document a row: its ``text_field`` column (quoted
  newlines, a byte-order mark and fields up to the document limit handled by the ``csv`` module).
- ``parquet`` / ``arrow``: the ``text_field`` column, in record batches (pyarrow, the ``parquet``
  extra); a Hugging Face ``datasets`` folder (``save_to_disk``) is read as its Arrow files.
- ``auto``: by the name, a compression suffix aside: ``jsonl`` for ``*.jsonl`` / ``*.json``, ``csv``
  for ``*.csv``, ``tsv`` for ``*.tsv`` / ``*.tab``, ``parquet`` for ``*.parquet`` / ``*.pq``,
  ``arrow`` for ``*.arrow`` / ``*.feather``; else by content (Parquet's and Arrow's magic bytes),
  else ``lines``. A file read as lines whose
  first line looks like a delimited header is read as asked, with a warning (``header_like``).

Compression is recognised by content, whatever the name: gzip, bzip2 and xz (standard library),
zstd (the ``zstd`` extra).

Reasons counted per file: ``missing``, ``unreadable``, ``symlink_loop``, ``not_a_file`` (FIFO,
socket, device), ``hidden`` (a name starting with "." met while walking a directory), ``binary``
(a NUL byte in the first 8 KB), ``empty``, ``corrupt`` (a broken .gz, .bz2 or .xz: documents read
before the damage are kept). Per document: ``invalid_utf8``, ``malformed_json``, ``not_an_object`` (a line that
is JSON but not an object), ``missing_field`` (a CSV row without the
text column counts here too), ``malformed_csv`` (a row the csv module cannot parse), ``too_long``
(a JSON line over the size limit, which cannot be cut and parsed), ``too_deep`` (a JSON line nesting
arrays or objects more than ``MAX_JSON_DEPTH`` levels); the first few of each are recorded as
``PATH:LINE`` (lines counted by "\n", from 1; a paragraph by its first line).
"""

from __future__ import annotations

import bz2
import csv
import errno
import glob
import gzip
import io
import json
import lzma
import os
import re
import stat
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from incr_cli.errors import UsageError, clip

try:
    from zstandard import ZstdError as _ZstdError
except ImportError:  # the zstd extra is not installed: a .zst file is refused before any read

    class _ZstdError(Exception):  # type: ignore[no-redef]
        pass

FORMATS = ("auto", "lines", "paragraphs", "jsonl", "csv", "tsv", "parquet", "arrow")
COLUMNAR = ("parquet", "arrow")  # read column-wise with pyarrow, in record batches
PYARROW_HINT = "pip install 'incr-cli[parquet]' (pyarrow)"
DELIMITERS = {"csv": ",", "tsv": "\t"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
ZSTD_HINT = "pip install 'incr-cli[zstd]' (the zstandard package)"
BINARY_SNIFF_BYTES = 8192
# Read buffer of every input, plain or decompressed: larger than the sniff, so that one peek sees all
# of it (a file's default buffer is its block size, often 4 KB).
_READ_BUFFER = 1 << 16
# A JSON line must be parsed whole; beyond this it is rejected rather than held in memory.
MAX_JSON_LINE_BYTES = 64 << 20
# Deeper JSON is no document record: it is rejected (``too_deep``) before Python's recursion limit
# (~1000) could turn one hostile line into a crash of the whole ingest.
MAX_JSON_DEPTH = 100
_GLOB_CHARS = set("*?[")


@dataclass
class Tally:
    """Counts of skipped files and rejected documents by reason, plus a few examples of each: the
    path of a skipped file, ``PATH:LINE`` of a rejected document (each cut to a bounded length)."""

    files: Counter = field(default_factory=Counter)
    docs: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    doc_examples: dict[str, list[str]] = field(default_factory=dict)
    fields_seen: Counter = field(default_factory=Counter)  # string fields of records missing --text-field
    warnings: list[str] = field(default_factory=list)  # input read as asked that may be meant otherwise
    max_examples: int = 10

    def skip_file(self, path: str, reason: str) -> None:
        self.files[reason] += 1
        self._example(self.examples, reason, path)

    def reject(self, reason: str, n: int = 1, *, path: str | None = None, line: int | None = None) -> None:
        self.docs[reason] += n
        if path is not None:
            self._example(self.doc_examples, reason, f"{path}:{line}" if line else path)

    def _example(self, examples: dict[str, list[str]], reason: str, where: str) -> None:
        shown = examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(clip(where))


@dataclass
class ReadState:
    """What reading one file did: bytes of it consumed so far, and why it was skipped (if it was)."""

    done: int = 0
    skipped: str | None = None


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute, as found (not resolved through symlinks)
    real: str  # resolved, used to read each file once
    size: int


# ----------------------------------------------------------------------------- finding files


def stat_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink_loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "missing"
    return "unreadable"


def _is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec)


def expand_paths(specs: list[str], tally: Tally, *, stdin: str | None = None) -> list[SourceFile]:
    """Files named by ``specs`` (files, directories walked recursively, globs), in a stable order.
    The spec "-" is standard input: the file ``stdin`` holding it, shown as "-" (skipped as
    ``missing`` when no such file was made).

    Each directory's entries are visited sorted by name; a file reached twice (through a symlink or
    two specs) is read once; a symlinked directory is followed once (loops end there).
    """
    finder = _Finder(tally)
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if spec == "-":
            if stdin is None:
                tally.skip_file("-", "missing")
            else:
                finder.seen_files.add(os.path.realpath(stdin))
                finder.found.append(SourceFile("-", stdin, os.path.getsize(stdin)))
        elif not os.path.lexists(spec) and _is_glob(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                tally.skip_file(spec, "missing")
            for match in matches:
                finder.visit(match)
        else:
            finder.visit(spec)
    return finder.found


class _Finder:
    """The files under the paths it visits, each once, skipping (and counting) what is no file."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.found: list[SourceFile] = []
        self.seen_files: set[str] = set()
        self.seen_dirs: set[str] = set()

    def visit(self, path: str) -> None:
        try:
            st = os.stat(path)  # follows symlinks: a loop raises ELOOP
        except OSError as exc:
            self.tally.skip_file(path, stat_reason(exc))
            return
        if stat.S_ISDIR(st.st_mode):
            arrow = dataset_files(path, self.tally)
            if arrow is None:
                self.walk(path)
            for part in arrow or []:
                self.visit(part)
        elif stat.S_ISREG(st.st_mode):
            real = os.path.realpath(path)
            if real not in self.seen_files:
                self.seen_files.add(real)
                self.found.append(SourceFile(os.path.abspath(path), real, st.st_size))
        else:
            self.tally.skip_file(path, "not_a_file")  # a FIFO would block open() forever

    def walk(self, top: str) -> None:
        real_top = os.path.realpath(top)
        if real_top in self.seen_dirs:
            return
        self.seen_dirs.add(real_top)
        # Our own recursion (not os.walk) so that symlinked folders are followed exactly once.
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.tally.skip_file(top, stat_reason(exc))
            return
        for entry in entries:
            if entry.name.startswith("."):
                self.tally.skip_file(entry.path, "hidden")
                continue
            self.visit(entry.path)


def dataset_files(folder: str, tally: Tally) -> list[str] | None:
    """The Arrow files of a Hugging Face ``datasets`` folder (``save_to_disk``), None for any other
    folder. A ``DatasetDict`` gives its ``train`` split (or its only one), with a warning naming the
    others; pass a split's own folder for another. Its JSON sidecars are never read as text."""
    top = Path(folder)
    try:
        if (top / "dataset_dict.json").is_file():
            splits = [str(x) for x in json.loads((top / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split is None:
                tally.skip_file(folder, "no_train_split")
                tally.warnings.append(f"{clip(folder)} is a DatasetDict without a train split ({', '.join(splits)}): "
                                      f"pass one split's folder, e.g. {clip(str(top / splits[0]))}")
                return []
            if len(splits) > 1:
                tally.warnings.append(f"{clip(folder)}: reading the {split} split of {', '.join(splits)}; pass "
                                      f"another split's folder (e.g. {clip(str(top / splits[-1]))}) to read it")
            return dataset_files(str(top / split), tally) or []
        if (top / "state.json").is_file() and (top / "dataset_info.json").is_file():
            state = json.loads((top / "state.json").read_text(encoding="utf-8"))
            return [str(top / str(part["filename"])) for part in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        tally.skip_file(folder, "corrupt")  # a datasets folder whose sidecars do not say where its data is
        return []
    return None


def default_name(spec: str) -> str:
    """An increment name from a path: its stem without extensions, with only safe characters."""
    if spec == "-":
        return "stdin"
    spec = os.path.expanduser(str(spec)).rstrip("/\\")
    if _is_glob(spec):
        parts = [p for p in Path(spec).parts if not _is_glob(p)]
        spec = parts[-1] if parts else ""
    stem = Path(spec).name
    for ext in (*COMPRESSED, ".jsonl", ".json", ".csv", ".tsv", ".tab", ".txt", ".text", ".md"):
        if stem.lower().endswith(ext) and len(stem) > len(ext):
            stem = stem[: -len(ext)]
    clean = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "-" for c in stem)
    clean = clean.strip("-._")[:40].rstrip("-._")
    return clean or "data"


def resolve_format(path: str, fmt: str, real: str | None = None) -> str:
    """The format ``auto`` means for a file named ``path`` (its content read at ``real``, default
    ``path``: standard input's spooled copy is named "-")."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".arrow", ".feather")):
        return "arrow"
    return _sniff(real or path)


def _sniff(path: str) -> str:
    """``lines``, unless the file starts like Parquet or an Arrow file (a name without its suffix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return "lines"  # the read that follows names the problem
    if head[:4] == b"PAR1":
        return "parquet"
    return "arrow" if head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff" else "lines"


def _decompressed(raw: io.BufferedReader) -> io.BufferedIOBase:
    """``raw``, or a reader of what it decompresses to when it starts with a gzip, bzip2 or xz header."""
    magic = raw.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        inner: io.IOBase = gzip.GzipFile(fileobj=raw, mode="rb")
    elif magic[:3] == b"BZh":
        inner = bz2.BZ2File(raw, mode="rb")
    elif magic == b"\xfd7zXZ\x00":
        inner = lzma.LZMAFile(raw, mode="rb")
    elif magic[:4] == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"{clip(raw.name)} is zstd-compressed: reading it needs {ZSTD_HINT}") from None
        inner = _ZstdReader(raw, zstandard)
    else:
        return raw
    return io.BufferedReader(inner, _READ_BUFFER)  # type: ignore[arg-type]


def open_binary(path: str) -> io.BufferedReader:
    """Open a file for reading (a seam for tests that simulate unreadable files, since root reads all)."""
    return open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 - the caller closes it


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of one or more zstd frames. Unlike zstandard's stream_reader, a frame
    cut short (a truncated download) raises ``ZstdError`` at the end instead of ending quietly, so
    the file counts as ``corrupt`` and the documents before the damage are kept."""

    def __init__(self, raw: io.BufferedReader, zstandard: Any) -> None:
        super().__init__()
        self.raw, self.zstd = raw, zstandard
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""
        self.started = False  # bytes of the current frame have been fed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            if self.frame.eof:  # one frame ended: another may follow
                rest = self.frame.unused_data
                self.frame, self.started = self.zstd.ZstdDecompressor().decompressobj(), False
                if rest:
                    self.pending, self.started = self.frame.decompress(rest), True
                    continue
            chunk = self.raw.read(_READ_BUFFER)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise self.zstd.ZstdError("the zstd frame is cut short (a truncated file)")
                return 0
            self.pending, self.started = self.frame.decompress(chunk), True
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


# ----------------------------------------------------------------------------- reading documents


class _Lines:
    """Bounded-length lines of a binary stream: ``(bytes, cut)`` where ``cut`` means the rest of an
    over-long line was skipped. Memory stays O(limit) whatever the line length."""

    def __init__(self, f: io.BufferedIOBase, limit: int):
        self.f = f
        self.limit = limit

    def __iter__(self) -> Iterator[tuple[bytes, bool]]:
        readline, limit = self.f.readline, self.limit
        while line := readline(limit):
            if len(line) < limit or line.endswith(b"\n"):
                yield line, False
                continue
            while (rest := readline(limit)) and not rest.endswith(b"\n"):
                pass  # drop the tail of an absurdly long line without holding it
            yield line, True


def _decode(raw: bytes, cut: bool) -> str | None:
    """Strict UTF-8; a line cut mid-character loses only that partial character."""
    for trim in range(4 if cut else 1):
        try:
            return raw[: len(raw) - trim].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_documents(src: SourceFile, fmt: str, text_field: str, max_doc_chars: int, tally: Tally,
                   state: ReadState) -> Iterator[tuple[str, bool]]:
    """Raw documents of one file: ``(text, cut)``; ``state`` tracks bytes consumed and any skip reason.

    Invalid UTF-8 rejects only the line (or paragraph) it is in; a binary or empty file is skipped
    whole; a broken .gz keeps what was read before the damage.
    """
    fmt = resolve_format(src.path, fmt, src.real)
    if fmt in COLUMNAR:
        yield from _read_columnar(src, fmt, text_field, tally, state)
        return
    try:
        raw = open_binary(src.real)
    except OSError as exc:
        state.skipped = stat_reason(exc)
        tally.skip_file(src.path, state.skipped)
        return
    with raw:
        try:
            stream = _decompressed(raw)
            head = stream.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]
            if not head or _looks_binary(head):
                state.skipped = "binary" if head else "empty"
                tally.skip_file(src.path, state.skipped)
                return
            # 4 bytes per character at most in UTF-8, plus the newline
            limit = MAX_JSON_LINE_BYTES if fmt == "jsonl" else 4 * max_doc_chars + 4
            lines = _Lines(stream, limit)
            if fmt in DELIMITERS:
                csv.field_size_limit(4 * max_doc_chars)  # a longer field is rejected, not held
                yield from _read_delimited(stream, src.path, DELIMITERS[fmt], text_field, tally,
                                           lambda: setattr(state, "done", raw.tell()))
            elif fmt == "lines":
                _warn_header_like(head, src.path, tally)
                yield from _read_lines(lines, src.path, tally, raw, state)
            elif fmt == "paragraphs":
                yield from _read_paragraphs(lines, src.path, max_doc_chars, tally, raw, state)
            elif fmt == "jsonl":
                yield from _read_jsonl(lines, src.path, text_field, tally, raw, state)
            else:
                raise ValueError(f"unknown format {fmt!r}")
        except (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError, _ZstdError) as exc:
            state.skipped = "unreadable" if isinstance(exc, PermissionError) else "corrupt"
            tally.skip_file(src.path, state.skipped)
        finally:
            state.done = src.size


def _read_lines(lines: _Lines, path: str, tally: Tally, raw: io.BufferedReader,
                state: ReadState) -> Iterator[tuple[str, bool]]:
    for i, (line, cut) in enumerate(lines):
        text = _decode(line, cut)
        if text is None:
            tally.reject("invalid_utf8", path=path, line=i + 1)
        elif not text.isspace():
            yield text, cut
        if not i & 1023:
            state.done = raw.tell()


def _read_paragraphs(lines: _Lines, path: str, max_doc_chars: int, tally: Tally, raw: io.BufferedReader,
                     state: ReadState) -> Iterator[tuple[str, bool]]:
    parts: list[str] = []
    size, cut, bad, first = 0, False, False, 0  # first: the paragraph's first line
    for i, (line, line_cut) in enumerate(lines):
        if not line.strip():
            if bad:
                tally.reject("invalid_utf8", path=path, line=first)
            elif parts:
                yield "\n".join(parts), cut
            parts, size, cut, bad, first = [], 0, False, False, 0
            continue
        first = first or i + 1
        if bad:
            continue
        text = _decode(line, line_cut)
        if text is None:
            bad = True  # the whole paragraph is one document: reject it once
            continue
        cut |= line_cut
        if size <= max_doc_chars:  # stop holding text once the document must be cut anyway
            parts.append(text)
            size += len(text)
        else:
            cut = True
        if not i & 1023:
            state.done = raw.tell()
    if bad:
        tally.reject("invalid_utf8", path=path, line=first)
    elif parts:
        yield "\n".join(parts), cut


def _read_jsonl(lines: _Lines, path: str, text_field: str, tally: Tally, raw: io.BufferedReader,
                state: ReadState) -> Iterator[tuple[str, bool]]:
    for i, (line, cut) in enumerate(lines):
        if not i & 1023:
            state.done = raw.tell()
        if cut:
            tally.reject("too_long", path=path, line=i + 1)
            continue
        if not line.strip():
            continue
        value, reason = parse_record(line, text_field)
        if reason:
            tally.reject(reason, path=path, line=i + 1)
            if reason == "missing_field" and sum(tally.fields_seen.values()) < MAX_FIELD_SAMPLES:
                tally.fields_seen.update(_string_fields(line))
        else:
            yield value, False


MAX_FIELD_SAMPLES = 50  # fields of records without the text field, kept to name them in the error
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_HEADER_NAME = re.compile(r"[A-Za-z_][\w.-]{0,39}")  # no spaces: prose with a comma is no header
_COLUMN_NAME = re.compile(r"[^\W\d][\w .-]{0,39}")  # worth naming in an error: short, a word first


def _read_delimited(stream: io.BufferedIOBase, path: str, delimiter: str, text_field: str, tally: Tally,
                    mark: Callable[[], None]) -> Iterator[tuple[str, bool]]:
    """CSV or TSV with a header row: each row's ``text_field`` column. A row the csv module cannot
    parse (or whose field is over its limit) is rejected and reading goes on at the next one;
    ``mark`` records how far into the file reading is."""
    rows = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=""),
                      delimiter=delimiter)
    header = next(rows, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    column = names.index(text_field) if text_field in names else None
    if column is None:
        tally.fields_seen.update(name for name in names if _COLUMN_NAME.fullmatch(name))  # not a row of text
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            tally.reject("too_long" if "field limit" in str(exc) else "malformed_csv", path=path, line=rows.line_num)
            continue
        if not rows.line_num & 1023:
            mark()
        if not row:
            continue  # a blank line
        if column is None or column >= len(row):
            tally.reject("missing_field", path=path, line=rows.line_num)
        elif _NOT_UTF8.search(row[column]):
            tally.reject("invalid_utf8", path=path, line=rows.line_num)
        elif row[column].strip():
            yield row[column], False


def _read_columnar(src: SourceFile, fmt: str, text_field: str, tally: Tally,
                   state: ReadState) -> Iterator[tuple[str, bool]]:
    """Parquet or Arrow (file or stream format, as ``datasets`` writes it): the ``text_field``
    column, read in record batches so memory stays bounded whatever the file's size. A null or
    non-string value counts as ``missing_field``; a file pyarrow cannot read is ``corrupt``."""
    try:
        import pyarrow
    except ImportError:
        raise UsageError(f"{clip(src.path)} is {fmt}: reading it needs {PYARROW_HINT}") from None
    try:
        names, rows, columns = _columns(src.real, fmt, text_field)
        if text_field not in names:
            tally.fields_seen.update(name for name in names if _COLUMN_NAME.fullmatch(name))
            tally.reject("missing_field", rows if rows is not None else sum(len(c) for c in columns), path=src.path)
            return
        done = 0
        for column in columns:
            for value in column.to_pylist():
                done += 1
                if not isinstance(value, str):
                    tally.reject("missing_field", path=src.path, line=done)
                elif value.strip():
                    yield value, False
            state.done = src.size * done // rows if rows else state.done
    except (pyarrow.ArrowException, OSError) as exc:
        state.skipped = "unreadable" if isinstance(exc, PermissionError) else "corrupt"
        tally.skip_file(src.path, state.skipped)
    finally:
        state.done = src.size


def _columns(path: str, fmt: str, text_field: str) -> tuple[list[str], int | None, Iterator]:
    """(column names, rows when known, an iterator of ``text_field``'s chunks) of a columnar file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "parquet":
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        batches = parquet.iter_batches(batch_size=4096, columns=[text_field]) if text_field in names else iter(())
        return names, parquet.metadata.num_rows, (b.column(0) for b in batches)
    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # not the file format: the stream format (datasets' .arrow files)
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    names = reader.schema.names
    if text_field not in names:
        return names, None, (b.column(0) for b in batches)  # counted, to say how many rows lacked it
    return names, None, (b.column(text_field) for b in batches)


def _warn_header_like(head: bytes, path: str, tally: Tally) -> None:
    """Warn when a file about to be read as lines starts like a CSV or TSV header ("id,text"): its
    header and other columns would become training text."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace").lstrip("\ufeff")
    for fmt, delimiter in DELIMITERS.items():
        names = first.split(delimiter)
        if len(names) >= 2 and all(_HEADER_NAME.fullmatch(name.strip()) for name in names):
            tally.warnings.append(f"{clip(path)} is read as lines, but its first line looks like a {fmt.upper()} "
                                  f"header ({clip(first, 80)}): pass --format {fmt} to read one column")
            return


def _string_fields(line: bytes) -> list[str]:
    """The keys of a JSON record whose values are strings: what --text-field could have named."""
    obj = json.loads(line.decode("utf-8").lstrip("\ufeff"))
    return [clip(str(k), 40) for k, v in obj.items() if isinstance(v, str)][:10]


def parse_record(line: bytes, text_field: str) -> tuple[str, str | None]:
    """One JSON Lines record -> (its ``text_field``, None), or ("", the reason it is rejected).

    The line must be UTF-8 (a BOM is dropped: concatenated files carry one per file); json's own
    UTF-16/32 guessing from bytes is not used, so a line with NUL bytes never parses as another encoding.
    """
    try:
        text = line.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        return "", "invalid_utf8"
    try:
        obj = json.loads(text)
    except RecursionError:  # nested deeper than Python's stack: the line is rejected, the ingest goes on
        return "", "too_deep"
    except ValueError:
        return "", "malformed_json"
    # Counting brackets is cheap and over-counts (brackets inside strings): only then is the tree walked.
    if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and _deeper_than(obj, MAX_JSON_DEPTH):
        return "", "too_deep"
    if not isinstance(obj, dict):  # a top-level array, number or string: not a record at all
        return "", "not_an_object"
    value = obj.get(text_field)
    if not isinstance(value, str):
        return "", "missing_field"
    if b"\\u" in line and not _encodable(value):  # a \ud800 escape: a lone surrogate has no UTF-8 form
        return "", "invalid_utf8"
    return value, None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _deeper_than(obj: object, limit: int) -> bool:
    """Whether a parsed JSON value nests arrays/objects more than ``limit`` levels (iteratively: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
