"""Resumable training state: saved every ``runtime.save_every`` steps and on SIGINT/SIGTERM
(``StopSignal`` turns a signal into a request the loop honours after its current step).

``WORKSPACE/staging/resume/<key>/`` holds numbered state folders and a ``CURRENT`` pointer:

```
state-00000120/  model.safetensors  (student weights, the only large file; safetensors)
                 trainer.pt         (optimizer, step, sampler position, progress; torch.save)
                 rng-<rank>.pt      (python, numpy, torch and CUDA RNG states of each rank)
CURRENT          "state-00000120", replaced atomically once the folder is complete
```

A save writes a new folder, fsyncs it, then moves the pointer, so a kill at any moment leaves the
previous state usable. Everything is loaded with ``torch.load(weights_only=True)``: plain tensors
and containers, never pickled code. The key is a hash of what decides the training (parent, data,
recipe), so a rerun of the same command finds its state and a changed command starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from incr_cli.errors import IntegrityError
from incr_cli.faults import fault_point
from incr_cli.store.diskspace import disk_writes, tensor_bytes
from incr_cli.store.files import atomic_write_text, fsync_dir, fsync_tree
from incr_cli.store.workspace import RESUME_POINTER, Workspace


def resume_key(fields: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable ``fields``."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, python, numpy), as plain tensors and ints."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class ResumeStore:
    """The resumable state of one training run (one key). ``barrier`` synchronises DDP ranks."""

    def __init__(self, ws: Workspace, key: str, *, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None):
        self.root = ws.resume_dir / key
        self.rank = rank
        self.barrier = barrier

    def current(self) -> Path | None:
        """The last complete state folder, or None."""
        try:
            name = (self.root / RESUME_POINTER).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        folder = self.root / name
        return folder if name.startswith("state-") and folder.is_dir() else None

    def save(self, step: int, model: torch.nn.Module, trainer: dict[str, Any], rng: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write the state after ``step`` steps. All ranks call it; rank 0 writes the shared files."""
        folder = self.root / f"state-{step:08d}"
        needs = tensor_bytes(model, trainer) if self.rank == 0 else None
        try:
            with disk_writes("resumable state", self.root, needs=needs):
                self._write(folder, model, trainer, rng, meta)
        except Exception:
            if self.rank == 0 and self.current() != folder:  # never pointed to: free its space
                shutil.rmtree(folder, ignore_errors=True)
            raise
        self.barrier()
        return folder

    def _write(self, folder: Path, model: torch.nn.Module, trainer: dict[str, Any], rng: dict[str, Any],
               meta: dict[str, Any]) -> None:
        if self.rank == 0:
            if folder.exists():  # left by a save that was killed before its pointer moved
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
        self.barrier()
        _save_file(rng, folder / f"rng-{self.rank}.pt")
        if self.rank == 0:
            save_model(model, str(folder / "model.safetensors"))
            fault_point("train.state_save")
            _save_file(trainer, folder / "trainer.pt")
        self.barrier()
        if self.rank == 0:
            fsync_tree(folder)
            fsync_dir(self.root)  # the folder's entry is on disk before the pointer names it
            fsync_dir(self.root.parent)  # and this run's folder (new at its first save)
            atomic_write_text(self.root / RESUME_POINTER, folder.name + "\n")
            for old in self.root.glob("state-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
            fsync_dir(self.root)

    def load(self, model: torch.nn.Module, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Load the weights into ``model``; -> (trainer state, this rank's RNG state), or None."""
        folder = self.current()
        if folder is None:
            return None
        try:
            missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False, device=str(device))
            if missing or unexpected:
                raise IntegrityError(f"{folder}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                                     f"unexpected {sorted(unexpected)[:3]}); remove {self.root} to start afresh")
            trainer = torch.load(folder / "trainer.pt", map_location=device, weights_only=True)
            rng = torch.load(folder / f"rng-{self.rank}.pt", map_location="cpu", weights_only=True)
        except IntegrityError:
            raise
        except Exception as exc:  # a torn or foreign file: name it, never a traceback
            raise IntegrityError(f"{folder}: resumable state cannot be read ({type(exc).__name__}: {exc}); "
                                 f"remove {self.root} to start afresh") from None
        return trainer, rng

    def clear(self) -> None:
        """Remove this run's state (after its version is written). Rank 0 only."""
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves state after the current step and stops.
    A second signal gets the previous handler (Ctrl-C twice still stops at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the run just cannot be stopped gently
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._handle:  # still ours: a handler set inside the block stays
                signal.signal(sig, handler or signal.SIG_DFL)  # None: a handler not set from Python
