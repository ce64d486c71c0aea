"""The workspace's write lock: an exclusive ``flock`` held for a process's lifetime, with a record of
its holder (pid, host, command) so a refused writer can name it. A dead holder releases it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from incr_cli.errors import UsageError, WorkspaceLocked, clip
from incr_cli.store.diskspace import disk_writes
from incr_cli.store.files import NOT_WRITABLE, now_iso

LOCK_FILE = ".incr.lock"


# ----------------------------------------------------------------------------- the lock


@dataclass
class LockInfo:
    pid: int
    host: str
    command: str
    started: str


class WorkspaceLock:
    """An exclusive, process-lifetime lock (``flock``): a killed holder releases it automatically.

    The lock file also records the holder, so a refused writer can name it. A file left behind by a
    dead process holds no flock and is simply taken over.
    """

    def __init__(self, root: Path, command: str):
        self.path = root / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self.took_over: LockInfo | None = None

    def read_holder(self) -> LockInfo | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return LockInfo(int(data["pid"]), str(data.get("host", "?")), str(data.get("command", "?")),
                            str(data.get("started", "?")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def live_holder(self) -> LockInfo | None:
        """The holder, when its record names a process alive on this host (a read: no flock taken, so a
        writer starting now is never refused because someone looked). A released lock's record is
        empty; a killed holder's names a dead PID."""
        holder = self.read_holder()
        if holder is None or holder.host != socket.gethostname():
            return None
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return holder

    def acquire(self) -> WorkspaceLock:
        self._check_writable()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in NOT_WRITABLE:
                raise
            raise self._not_writable(self.path, exc.strerror) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self.read_holder()
            who = f"PID {holder.pid} on {holder.host} ({holder.command}, since {holder.started})" if holder else "another process"
            raise WorkspaceLocked(f"workspace {self.path.parent} is locked by {who}; wait for it to finish") from None
        self.took_over = self.read_holder()  # a record left by a process that died holding the lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": now_iso()}
        try:
            with disk_writes("the workspace lock", self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)  # and with it the flock
            raise
        self._fd = fd
        return self

    def _check_writable(self) -> None:
        """Refuse, before any work, a workspace this process cannot write (a read-only mount, another
        user's folders): every writing command takes the lock first, so this is where it is known."""
        root = self.path.parent
        for folder in (root, root / "checkpoints", root / "data", root / "staging"):
            if folder.is_dir() and not os.access(folder, os.W_OK):
                raise self._not_writable(folder, "read-only file system" if _read_only_mount(folder)
                                         else "permission denied")

    def _not_writable(self, path: Path, why: str | None) -> UsageError:
        return UsageError(f"{clip(str(path))}: cannot be written ({(why or 'not writable').lower()}); "
                          f"'{self.command}' writes into the workspace: run it where the workspace is writable "
                          f"(or as its owner)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
