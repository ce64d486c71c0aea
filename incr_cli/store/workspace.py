"""The workspace: layout, lock, atomic folder writes, manifests and checksums, LATEST, lineage.

```
WORKSPACE/
  recipe.yaml            resolved recipe of this model line
  LATEST                 name of the newest promoted version, e.g. "v0002"
  current                symlink to checkpoints/<LATEST>, replaced atomically (the serving path)
  history.jsonl          audit trail: one JSON line per move of LATEST (init, training, promote, rollback)
  .incr.lock             holder of the write lock (pid, host, command); flock-guarded
  checkpoints/vNNNN/     save_pretrained layout + manifest.json (+ metrics.json, train_log.jsonl)
  data/dNNNN-NAME/       token shards + manifest.json;  data/index.sqlite: dedup index
  staging/               temporary folders (same filesystem, renamed into place) and resumable state
  eval/                  eval results and their cache
```

Invariants: a version or increment folder appears whole (written under ``staging/``, fsynced,
renamed) or not at all, and is never modified afterwards; ``LATEST`` is replaced atomically and
always names a complete version and moves only through ``Workspace.move_latest``, which also points
``current`` at it and appends the audit record; every writing command holds the lock, readers need none.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from incr_cli import FORMAT_VERSION, __version__
from incr_cli.errors import DiskFull, IntegrityError, UsageError, clip, shown
from incr_cli.faults import fault_point
from incr_cli.store.files import (
    MANIFEST,
    append_line,
    atomic_write_text,
    file_records,
    filled_then_renamed,
    folder_bytes,
    fsync_dir,
    now_iso,
    path_errors,
    read_lines,
    read_manifest,
    safe_relpath,
    sha256_file,
    write_json,
)
from incr_cli.store.lock import LOCK_FILE, WorkspaceLock

VERSION_RE = re.compile(r"^v(\d{4,})$")
_LATEST_MAX_BYTES = 4096  # LATEST holds one version name; more is never read
INCREMENT_RE = re.compile(r"^d(\d{4,})-([A-Za-z0-9][A-Za-z0-9._-]*)$")
RESUME_POINTER = "CURRENT"  # staging/resume/KEY/CURRENT names the last complete state-NNNNNNNN folder
HISTORY_FILE = "history.jsonl"
CURRENT_LINK = "current"
MOVE_INTENT = "latest-move.json"  # staging/latest-move.json: the move of LATEST in progress
PRUNED_FILE = "pruned.json"  # checkpoints/vNNNN/pruned.json: gc removed the files it lists


# ----------------------------------------------------------------------------- the workspace


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._cache: _VerifyCache | None = None  # read once per Workspace object, not once per folder
        self._deferred = 0  # > 0 inside verifying_many(): the cache is saved once, at its end

    # layout
    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def resume_dir(self) -> Path:
        """``staging/resume``: one folder per interrupted run, named by its run key."""
        return self.staging / "resume"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def index_path(self) -> Path:
        return self.data / "index.sqlite"

    @property
    def latest_path(self) -> Path:
        return self.root / "LATEST"

    @classmethod
    def open(cls, root: Path | str) -> Workspace:
        """Open an existing workspace; a path that is not one is a UsageError."""
        ws = cls(Path(root))
        with path_errors(ws.root):
            return ws._checked()

    def _checked(self) -> Workspace:
        root, latest = clip(str(self.root)), clip(str(self.latest_path))
        if not self.root.is_dir():
            raise UsageError(f"{root}: no such workspace; create one with `incr init {root} --base SOURCE`")
        if self.checkpoints.is_dir() and self.recipe_path.is_file() and not self.latest_path.is_file() and self.versions():
            # Never suggest `init --force` here: that would wipe the versions and data that are still intact.
            raise IntegrityError(f"{latest}: missing; write the newest good version into it "
                                 f"(one of {', '.join(self.versions())}), e.g. `echo {self.versions()[-1]} > {latest}`")
        if not (self.latest_path.is_file() and self.checkpoints.is_dir() and self.recipe_path.is_file()):
            raise UsageError(f"{root}: not an incr workspace (no LATEST, recipe.yaml or checkpoints/); "
                             f"create one with `incr init {root} --base SOURCE`")
        return self

    def lock(self, command: str) -> WorkspaceLock:
        return WorkspaceLock(self.root, command)

    def is_workspace(self) -> bool:
        return self.latest_path.exists() or self.checkpoints.exists()

    # staging
    @contextlib.contextmanager
    def staged_folder(self, final: Path) -> Iterator[Path]:
        """Yield an empty folder under ``staging/``; on success fsync it and rename it to ``final``.

        On any exception the staged folder is removed and ``final`` is untouched. ``final`` must not exist.
        """
        self.staging.mkdir(parents=True, exist_ok=True)

        def ready() -> None:
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True)
                fsync_dir(final.parent.parent)  # the new folder's own entry
            if final.exists():
                raise IntegrityError(f"{final}: already exists; versions and increments are never overwritten")

        with filled_then_renamed(self.staging / f"tmp-{final.name}-{uuid.uuid4().hex[:8]}", final, ready) as tmp:
            yield tmp

    def copy_to(self, dest: Path | str) -> Workspace:
        """A copy of this workspace at ``dest`` (a branch of the model line to try something on).

        Everything but the lock file and ``staging/``: its temporary folders and resumable states
        belong to this workspace's runs, and its verify cache names this workspace's paths.
        """
        dest = Path(dest)
        top = os.path.realpath(self.root)
        shutil.copytree(self.root, dest, symlinks=True, ignore=lambda folder, names: [
            n for n in names if os.path.realpath(folder) == top and n in (LOCK_FILE, "staging")])
        return Workspace.open(dest)

    def clean_staging(self) -> list[str]:
        """Remove temporary folders left by killed writers (call while holding the lock)."""
        removed = []
        if self.staging.is_dir():
            for tmp in self.staging.glob("tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        return removed

    def resume_states(self) -> list[dict[str, Any]]:
        """The resumable states of interrupted runs (``staging/resume/KEY``), oldest run first.

        Each: key, path, bytes, and what the run's ``meta.json`` says (parent, new, steps, step
        reached); a state whose pointer or meta cannot be read is listed with ``step`` None.
        """
        root = self.resume_dir
        states = []
        for folder in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.is_dir() else []:
            if not folder.is_dir():
                continue
            entry: dict[str, Any] = {"key": folder.name, "path": str(folder), "parent": None, "new": [],
                                     "steps": None, "step": None,
                                     "bytes": folder_bytes(folder)}
            try:
                current = (folder / RESUME_POINTER).read_text(encoding="utf-8").strip()
                meta = json.loads((folder / current / "meta.json").read_text(encoding="utf-8"))
                entry.update(parent=meta.get("parent"), new=list(meta.get("new") or []), steps=meta.get("steps"),
                             step=int(current.removeprefix("state-")))
            except (OSError, ValueError):
                pass
            states.append(entry)
        return states

    # versions
    def versions(self) -> list[str]:
        """Complete versions (their folder was renamed into place), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p.name for p in self.checkpoints.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def version_dir(self, version: str) -> Path:
        return self.checkpoints / version

    def next_version(self) -> str:
        versions = self.versions()
        return f"v{(int(versions[-1][1:]) + 1) if versions else 0:04d}"

    def latest(self) -> str:
        try:
            with open(self.latest_path, "rb") as f:  # a version name is short: a huge or binary LATEST is not read whole
                name = f.read(_LATEST_MAX_BYTES).decode("utf-8", "replace").strip()
        except OSError as exc:
            raise IntegrityError(f"{self.latest_path}: cannot be read ({clip(str(exc))})") from None
        if not VERSION_RE.match(name) or not self.version_dir(name).is_dir():
            raise IntegrityError(f"{self.latest_path}: names {shown(name)}, which is not a version here; "
                                 f"write the newest good version (one of {', '.join(self.versions())}) into it")
        return name

    # LATEST, current and the audit trail
    @property
    def history_path(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def current_path(self) -> Path:
        return self.root / CURRENT_LINK

    def history(self) -> list[dict[str, Any]]:
        """Every recorded move of LATEST, oldest first (a line torn by a crash is skipped)."""
        return read_lines(self.history_path)[0]

    def move_latest(self, version: str, *, command: str, reason: str | None = None) -> dict[str, Any] | None:
        """The one way LATEST moves: write LATEST, point ``current`` at it, append the audit record.

        The caller holds the lock and has checked ``version``. The move is announced in
        ``staging/latest-move.json`` first, so a run killed halfway is completed (or dropped, when
        LATEST had not moved yet) by the next mover. -> the record appended; None when LATEST
        already named ``version`` (nothing recorded: a repeated move is a no-op).
        """
        self.finish_interrupted_move()
        before = self.latest_name()
        if before == version:
            self._point_current(version)
            return None
        record = {"id": uuid.uuid4().hex, "time": now_iso(), "from": before, "to": version, "command": command,
                  "user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "reason": reason,
                  "exit_state": "completed"}
        self.staging.mkdir(parents=True, exist_ok=True)
        write_json(self.staging / MOVE_INTENT, record)
        fault_point("latest.write")
        atomic_write_text(self.latest_path, version + "\n")
        fault_point("latest.link")
        self._point_current(version)
        fault_point("latest.record")
        append_line(self.history_path, record)
        (self.staging / MOVE_INTENT).unlink(missing_ok=True)
        return record

    def finish_interrupted_move(self) -> dict[str, Any] | None:
        """Complete the move of a command killed while moving LATEST (call holding the lock).

        -> its record when LATEST had moved (``current`` and the record are written now, marked
        "completed after an interruption"); None when nothing was in progress or LATEST had not moved.
        """
        intent = self.staging / MOVE_INTENT
        try:
            record = json.loads(intent.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = {}
        done = None
        if isinstance(record, dict) and record.get("to") and self.latest_name() == record["to"]:
            self._point_current(record["to"])
            if all(r.get("id") != record.get("id") for r in self.history()[-5:]):
                done = {**record, "exit_state": "completed after an interruption"}
                append_line(self.history_path, done)
        intent.unlink(missing_ok=True)
        return done

    def current_target(self) -> str | None:
        """The version ``current`` points at (None: missing or not a link into checkpoints/)."""
        try:
            target = Path(os.readlink(self.current_path))
        except OSError:
            return None
        return target.name if target.parent == Path("checkpoints") and VERSION_RE.match(target.name) else None

    def latest_name(self) -> str | None:
        """LATEST's content, or None before init wrote it."""
        try:
            return self.latest_path.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def _point_current(self, version: str) -> None:
        """``current`` -> checkpoints/VERSION, swapped in with one rename (a reader sees the old or new link)."""
        if self.current_target() == version:
            return
        if self.current_path.exists() and not self.current_path.is_symlink():
            raise UsageError(f"{self.current_path}: exists and is not a symlink; move it away so incr can "
                             "keep the serving link there")
        tmp = self.root / f".{CURRENT_LINK}.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(Path("checkpoints") / version, tmp)
        try:
            fsync_dir(self.root)  # the new link is a directory entry: on disk before it is renamed
            os.replace(tmp, self.current_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)

    def resolve_version(self, spec: str | None) -> str:
        """``None``/"latest" -> LATEST; "vNNNN" (or "N") -> that version; anything else is a UsageError."""
        if spec in (None, "", "latest", "LATEST"):
            return self.latest()
        spec = spec.strip()
        if spec.isdigit():
            spec = f"v{int(spec):04d}"
        if spec not in self.versions():
            raise UsageError(f"unknown version {shown(spec)}; valid versions: {', '.join(self.versions()) or 'none'}")
        return spec

    def pruned(self, version: str) -> dict[str, Any] | None:
        """What gc recorded when it removed a version's weights (``pruned.json``); None if not pruned."""
        path = self.version_dir(version) / PRUNED_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{path}: cannot be parsed ({exc}); rerun `incr gc {self.root}`") from None
        if not isinstance(record, dict):
            raise IntegrityError(f"{path}: expected a JSON object; rerun `incr gc {self.root}`")
        return record

    def require_weights(self, version: str) -> None:
        """A UsageError naming ``version`` when gc pruned it (its weights and tokenizer are gone)."""
        record = self.pruned(version)
        if record is not None:
            kept = [v for v in self.versions() if self.pruned(v) is None]
            raise UsageError(f"{version} was pruned by gc on {record.get('time', '?')}: its weights are gone (its "
                             f"manifest, metrics and scores remain); choose a version with weights: {', '.join(kept)}")

    def version_manifest(self, version: str) -> dict[str, Any]:
        return read_manifest(self.version_dir(version))

    def lineage(self, version: str) -> list[str]:
        """``version`` and its ancestors (each manifest's ``parent``), oldest first.

        Stops at a parent whose folder is gone (the chain still present); a chain that loops back is
        an IntegrityError, since no version can be its own ancestor.
        """
        chain = [version]
        while (parent := self.version_manifest(chain[-1]).get("parent")) and self.version_dir(parent).is_dir():
            if parent in chain:
                raise IntegrityError(f"{self.version_dir(version) / MANIFEST}: the parent chain loops back to "
                                     f"{parent}; restore the manifests")
            chain.append(parent)
        return chain[::-1]

    def trained_on(self, version: str) -> list[str]:
        """Increments a version has been trained on (its whole lineage)."""
        return list(self.version_manifest(version).get("trained_on", []))

    # increments
    def increments(self) -> list[str]:
        """Complete data increments, oldest first."""
        if not self.data.is_dir():
            return []
        found = [p.name for p in self.data.iterdir() if p.is_dir() and INCREMENT_RE.match(p.name)]
        return sorted(found, key=lambda d: int(INCREMENT_RE.match(d).group(1)))  # type: ignore[union-attr]

    def increment_dir(self, increment: str) -> Path:
        return self.data / increment

    def increment_manifest(self, increment: str) -> dict[str, Any]:
        return read_manifest(self.increment_dir(increment))

    def next_increment(self, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UsageError(f"increment name {shown(name)}: use letters, digits, '.', '_' or '-'")
        existing = self.increments()
        n = int(INCREMENT_RE.match(existing[-1]).group(1)) + 1 if existing else 1  # type: ignore[union-attr]
        return f"d{n:04d}-{name}"

    def resolve_increments(self, specs: list[str]) -> list[str]:
        """Increment ids from full ids or their dNNNN prefix; unknown ones are a UsageError."""
        known = self.increments()
        out = []
        for spec in specs:
            match = [d for d in known if d == spec or d.split("-", 1)[0] == spec]
            if not match:
                raise UsageError(f"unknown increment {shown(spec)}; valid increments: {', '.join(known) or 'none'}")
            out.append(match[0])
        return out

    def pending(self, version: str) -> list[str]:
        """Increments ingested but not yet trained into ``version``'s lineage."""
        seen = set(self.trained_on(version))
        return [d for d in self.increments() if d not in seen]

    # integrity
    def verify_folder(self, folder: Path, *, use_cache: bool = True) -> dict[str, Any]:
        """Check every file of a version or increment against its manifest; return the manifest.

        sha256 results are cached by (path, size, mtime, ctime, inode) so unchanged files are hashed once.
        """
        manifest = read_manifest(folder)
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise IntegrityError(f"{folder / MANIFEST}: lists no files; restore it or remove the folder")
        pruned = self.pruned(folder.name) if folder.parent == self.checkpoints else None
        removed = set(pruned.get("removed") or []) if pruned else set()
        cache = self._verify_cache() if use_cache else None
        for rel, rec in files.items():
            if rel in removed:  # gc took it away on purpose; what remains must still match
                continue
            path = safe_relpath(folder, rel)
            if not isinstance(rec, dict):
                raise IntegrityError(f"{folder / MANIFEST}: the entry of {shown(rel)} is not a size and sha256; "
                                     "the manifest was tampered with")
            try:
                st = path.stat()
            except OSError as exc:
                why = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
                raise IntegrityError(f"{folder.name}: file {clip(rel)} {why}; restore it or remove {folder}") from None
            if st.st_size != rec.get("size") or not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{folder.name}: file {clip(rel)} has {st.st_size} bytes, the manifest says "
                                     f"{shown(rec.get('size'))}; it is truncated or altered")
            digest = cache.get(path, st) if cache else None
            if digest is None:
                digest = sha256_file(path)
                if cache:
                    cache.put(path, st, digest)
            if digest != rec.get("sha256"):
                raise IntegrityError(f"{folder.name}: file {clip(rel)} does not match its sha256 in the manifest; "
                                     "it was altered")
        if cache and not self._deferred:
            cache.save()
        return manifest

    def _verify_cache(self) -> _VerifyCache:
        if self._cache is None:
            self._cache = _VerifyCache(self.staging / "verify-cache.json")
        return self._cache

    @contextlib.contextmanager
    def verifying_many(self) -> Iterator[None]:
        """Verify several folders with one write of the verify cache at the end instead of one per
        folder: a lineage of k increments would otherwise rewrite (and fsync) the cache k times."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self._cache is not None:
                self._cache.save()

    def verify_version(self, version: str) -> dict[str, Any]:
        return self.verify_folder(self.version_dir(version))

    def verify_increment(self, increment: str) -> dict[str, Any]:
        return self.verify_folder(self.increment_dir(increment))


def rollback_chain(records: list[dict[str, Any]]) -> list[str]:
    """The versions a rollback walks back through, oldest first, read from the audit trail.

    Every move pushes its target; a rollback pops the version it leaves. The last entry is LATEST
    as recorded; the one before it is where ``incr rollback`` goes.
    """
    chain: list[str] = []
    for record in records:
        to, before = record.get("to"), record.get("from")
        if not chain and before:  # a trail begun on a workspace older than the trail
            chain.append(before)
        if record.get("command") == "rollback" and len(chain) >= 2 and chain[-2] == to:
            chain.pop()
        elif to:
            chain.append(to)
    return chain


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return str(os.getuid())


def base_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """Common head of every manifest: format, kind, creation time and incr version."""
    return {"format": FORMAT_VERSION, "kind": kind, "created": now_iso(), "incr_version": __version__, **fields}


def seal_folder(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record sha256 and size of every file of a staged folder in its manifest and write it."""
    manifest = {**manifest, "files": file_records(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


class _VerifyCache:
    """sha256 of files keyed by their stat; a best-effort cache (readers hold no lock)."""

    def __init__(self, path: Path):
        self.path = path
        self.dirty = False
        try:
            self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _key(st: os.stat_result) -> list[int]:
        # ctime too: an in-place edit that restores the mtime (os.utime) still changes the ctime.
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def get(self, path: Path, st: os.stat_result) -> str | None:
        rec = self.data.get(os.path.abspath(path))  # the stat key below decides; no symlink walk per file
        return rec[1] if rec and rec[0] == self._key(st) else None

    def put(self, path: Path, st: os.stat_result, digest: str) -> None:
        self.data[os.path.abspath(path)] = [self._key(st), digest]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError, DiskFull):  # a cache: a full disk only costs hashing again
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.data))
            self.dirty = False
