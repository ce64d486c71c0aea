"""A full disk, recognised in one place and told in one line.

Each library reports a full disk in its own words: Python's own writes raise ``OSError`` ENOSPC
(EDQUOT over quota), ``torch.save``'s zip writer a ``RuntimeError`` (``unexpected pos ...`` or
``file write failed``: a short write), safetensors a ``SafetensorError`` (``No space left on device
(os error 28)``), sqlite an ``OperationalError`` (``database or disk is full``). ``is_disk_full``
knows them all; ``disk_writes`` turns them into ``DiskFull`` at a write site, which the CLI prints as

    error: no space left on device: <what>, <where>[, needs ~N MB]; free space and rerun the same command

and exits 1. Every writer uses it the same way (``workspace.atomic_write_bytes`` already does, so a
new JSON or text file written through it is covered)::

    with disk_writes("version v0002", ws.checkpoints, needs=weight_bytes):
        ...  # write; on failure the caller's own cleanup (a staged folder) removes what was half-written

With ``needs`` the free space is checked first: a write that cannot fit is refused before it starts,
and the message says how much it needs. A nested site is named inside the outer one (``version
v0002 (manifest.json)``); ``--debug`` shows the library's own error.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from incr_cli.errors import DiskFull

_CODES = {errno.ENOSPC, errno.EDQUOT}
# The words of a full disk (or quota) in error texts: Rust's io::Error (safetensors), sqlite, strerror.
_TEXTS = ("no space left on device", "os error 28", "os error 122", "disk quota exceeded", "database or disk is full")
# Texts that mean a full disk only when the disk is indeed (nearly) full: torch.save's zip writer after
# a short write, sqlite when it cannot grow its shared-memory file (a WAL index on a full disk).
_SHORT_WRITE = ("unexpected pos", "file write failed", "disk i/o error")
_NEARLY_FULL = 1 << 20


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest
    existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, where: Path | str | None = None) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the disk or quota is full.

    The ambiguous texts (torch's short write, sqlite's "disk I/O error") count only when ``where``
    is given and its filesystem has under 1 MiB left: on a disk with room they are some other
    failure, not to be misnamed.
    """
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CODES:
            return True
        text = str(e).lower()
        if any(t in text for t in _TEXTS):
            return True
        if where is not None and any(t in text for t in _SHORT_WRITE):
            with contextlib.suppress(OSError):
                return free_bytes(where) < _NEARLY_FULL
    return False


def check_free(what: str, where: Path | str, needs: int) -> None:
    """DiskFull before a write of about ``needs`` bytes that cannot fit where it goes."""
    if free_bytes(where) < needs:
        raise DiskFull(what, where, needs)


@contextlib.contextmanager
def disk_writes(what: str, where: Path | str, *, needs: int | None = None) -> Iterator[None]:
    """Turn a full disk met inside the block into ``DiskFull(what, where, needs)``; with ``needs``,
    refuse first when the free space is already short. Other errors pass through unchanged."""
    if needs:
        check_free(what, where, needs)
    try:
        yield
    except DiskFull as inner:  # an inner site (a file of this version): named inside the outer one
        raise DiskFull(f"{what} ({inner.what})", where, needs or inner.needs) from inner
    except Exception as exc:
        if is_disk_full(exc, where):
            raise DiskFull(what, where, needs) from exc
        raise


def tensor_bytes(*objs: Any) -> int:
    """Bytes of every distinct tensor in ``objs`` (nested dicts, lists, modules): about what a save
    of them writes, for ``needs``."""
    import torch

    sizes: dict[int, int] = {}
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.nn.Module):
            stack.append(obj.state_dict())
        elif isinstance(obj, torch.Tensor):
            sizes[obj.data_ptr()] = obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return sum(sizes.values())


def unattributed(exc: BaseException) -> DiskFull | None:
    """The DiskFull for a full disk no write site claimed (the CLI's last resort), else None."""
    if not is_disk_full(exc):
        return None
    name = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    return DiskFull(f"writing {Path(name).name}" if name else "a write", Path(name).parent if name else "the workspace")
