"""Durable files: atomic writes (staged, fsynced, renamed), JSON lines, checksums, manifests and
folders that appear whole or not at all. Every file the workspace holds is written through here."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from incr_cli import FORMAT_VERSION
from incr_cli.errors import IntegrityError, UsageError, clip, shown
from incr_cli.store.diskspace import disk_writes

MANIFEST = "manifest.json"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic file helpers


def folder_bytes(folder: Path) -> int:
    """The size of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staged_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: Path, data: bytes, what: str | None = None) -> None:
    """Write ``path`` so that readers see the old or the new content, never a mix: a temporary file
    in the same folder, fsynced, renamed over ``path``, then the folder fsynced. A full disk is a
    ``DiskFull`` naming ``what`` (default: the file's name) and leaves ``path`` as it was."""
    tmp = _staged_name(path)
    with disk_writes(what or path.name, path.parent):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, what: str | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)


@contextlib.contextmanager
def path_errors(path: Path, what: str = "cannot be used as a workspace") -> Iterator[None]:
    """An OSError from looking at or creating ``path`` (a name too long, a file where a folder should
    be) is the user's to fix: a UsageError naming the path, not a crash. A full disk stays exit 1."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise UsageError(f"{clip(str(path))}: {what} ({exc.strerror or exc})") from None


NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only filesystem, or permission denied


def check_writable(path: Path, option: str) -> None:
    """Fail before minutes of work when ``path`` (an output file option) cannot be written atomically."""
    with path_errors(path, f"{option} cannot be written"):
        if not path.parent.is_dir():
            raise UsageError(f"{option} {clip(str(path))}: the folder {clip(str(path.parent))} does not exist")
        if path.is_dir():
            raise UsageError(f"{option} {clip(str(path))}: is a folder; name a file")
        probe = _staged_name(path)
        probe.open("wb").close()
        probe.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it. A line torn by a crash is closed off with a newline first,
    so it never merges with the next record (readers skip it: see ``read_lines``)."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    created = not path.exists()
    with disk_writes(path.name, path.parent):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            if os.write(fd, line) < len(line):  # a full disk took only part of the line: drop it
                os.ftruncate(fd, size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """-> (the JSON objects of a JSON-lines file, oldest first; how many lines could not be parsed).

    A missing file holds no records; an unparsable line (torn by a crash mid-append) is skipped.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records, bad = [], 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (nan, inf) replaced by None, through dicts, lists and tuples:
    what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def sha256_file(path: Path | str, chunk: int = 1 << 20, opener: Callable[[str], BinaryIO] | None = None) -> str:
    """sha256 of a file's bytes, hex. ``opener`` (default ``open(path, "rb")``) opens it: ingest passes
    ``readers.open_binary``, its seam for simulating unreadable files."""
    h = hashlib.sha256()
    with (opener or _open_binary)(str(path)) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def file_records(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file under ``folder`` (relative POSIX paths)."""
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        records[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return records


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fsync_dir(path)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode ``open()`` would (0666 less the umask). safetensors
    writes its files 0600, so a server running as another user could not read a version's weights."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


@contextlib.contextmanager
def filled_then_renamed(tmp: Path, final: Path, ready: Callable[[], None] | None = None) -> Iterator[Path]:
    """The one way a folder appears whole or not at all: make ``tmp``, yield it to be filled, fsync
    it, call ``ready`` (last checks), rename it to ``final`` and fsync both folders. On any
    exception ``tmp`` is removed and ``final`` is untouched. Its files get the modes the umask gives."""
    tmp.mkdir()
    try:
        yield tmp
        umask_modes(tmp)
        fsync_tree(tmp)
        if ready is not None:
            ready()
        os.rename(tmp, final)  # a non-empty ``final`` created meanwhile makes this fail: nothing is overwritten
        fsync_dir(final.parent)  # the new entry...
        if tmp.parent != final.parent:
            fsync_dir(tmp.parent)  # ...and the one that left
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_beside(final: Path, tag: str) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final`` (``.NAME.TAG-XXXXXXXX``, on the same filesystem);
    on success it is fsynced and renamed to ``final``, so ``final`` appears whole or not at all.

    For folders outside a workspace (``incr export``'s OUT, ``incr compress``'s new line). The
    leftovers of a writer killed while it built the same ``final`` are removed first; on any
    exception the folder is removed. ``final`` must not exist (or be an empty folder)."""
    prefix = f".{final.name}.{tag}-"
    for stale in final.parent.glob(glob.escape(prefix) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    with filled_then_renamed(final.parent / f"{prefix}{uuid.uuid4().hex[:8]}", final) as tmp:
        yield tmp


def safe_relpath(folder: Path, rel: str) -> Path:
    """``folder / rel``, refusing absolute paths and anything that escapes ``folder``."""
    if not isinstance(rel, str) or "\x00" in rel:
        raise IntegrityError(f"{folder / MANIFEST}: file path {shown(rel)} is not a path; the manifest was tampered with")
    if not rel or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
        raise IntegrityError(f"{folder / MANIFEST}: file path {shown(rel)} points outside {folder}; the manifest was tampered with")
    path = folder / rel
    if "/" not in rel and not path.is_symlink():  # a plain file name in the folder: nothing to resolve
        return path
    if not path.resolve().is_relative_to(folder.resolve()):
        raise IntegrityError(f"{folder / MANIFEST}: file path {shown(rel)} points outside {folder}; the manifest was tampered with")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse ``folder/manifest.json``; a missing, unparsable or too-new manifest is an IntegrityError."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; this folder is not a complete version or increment") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else clip(str(exc))
        raise IntegrityError(f"{path}: cannot be parsed ({why}); restore it or remove the folder") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: expected a JSON object; restore it or remove the folder")
    fmt = data.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise IntegrityError(f"{path}: format {shown(fmt)} is newer than this incr understands ({FORMAT_VERSION}); "
                             "upgrade incr")
    return data
