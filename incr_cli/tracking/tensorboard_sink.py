"""The TensorBoard sink: one event folder a version, plus the line across versions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from incr_cli.faults import fault_point
from incr_cli.scoring.continual import gate_line
from incr_cli.store.files import read_lines
from incr_cli.store.workspace import VERSION_RE, Workspace
from incr_cli.tracking.base import RunInfo, train_scalars, version_scalars, written_metrics

# ----------------------------------------------------------------------------- TensorBoard


class TensorBoardSink:
    """One run per version (``ROOT/vNNNN``) with the training curves and the version's scores, and
    a ``ROOT/line`` run with the scores at step = version number: the line's history across versions."""

    name = "tensorboard"
    FINISHED = "incr-finished"  # written last into a version's folder: without it a killed run left it

    def __init__(self, root: Path):
        self.root = root
        self.writer: Any = None
        self.version = ""

    def start(self, run: RunInfo, history: list[dict[str, Any]]) -> None:
        writer_type = _summary_writer()
        folder = self.root / run.version
        shutil.rmtree(folder, ignore_errors=True)  # written again from the history: no duplicated steps
        self.writer, self.version = writer_type(str(folder)), run.version
        self.writer.add_text("run", f"{run.version} from {run.parent}: new {', '.join(run.new)}; run key {run.key}")
        for line in history:
            self.step(line)

    def step(self, line: dict[str, Any]) -> None:
        for tag, value in train_scalars(line).items():
            self.writer.add_scalar(tag, value, line["step"])
        self.writer.flush()

    def finish(self, metrics: dict[str, Any], version_dir: Path) -> None:
        fault_point("tracking.finish")  # the version is written: a kill here leaves its folder without scores
        scalars = version_scalars(metrics)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, metrics["steps"])
        checks = "; ".join(gate_line(c) for c in metrics["gate"]["checks"])
        self.writer.add_text("gate", f"{metrics['version']} {metrics['status']}" + (f"; {checks}" if checks else ""))
        self.writer.close()
        number = int(metrics["version"].lstrip("v"))
        # purge_step: a version written again replaces its point instead of adding a second one
        line = _summary_writer()(str(self.root / "line"), purge_step=number)
        for tag, value in scalars.items():
            line.add_scalar(tag, value, number)
        line.close()
        (self.root / metrics["version"] / self.FINISHED).write_bytes(b"")

    def reconcile(self, ws: Workspace) -> None:
        """A version's folder a killed command left without its scores (no FINISHED mark) is written
        again from the version's own files, when the version was written; else a resume rewrites it
        or a fresh start replaces it."""
        folders = sorted(self.root.iterdir()) if self.root.is_dir() else []
        for folder in folders:
            if not VERSION_RE.match(folder.name) or (folder / self.FINISHED).exists():
                continue
            written = written_metrics(ws, folder.name)
            if written is None:
                continue
            manifest, metrics = written
            log, _ = read_lines(ws.version_dir(folder.name) / "train_log.jsonl")
            self.start(RunInfo(folder.name, str(manifest.get("parent")), str(manifest.get("run_key")),
                               list(manifest.get("new") or []), {}), log)
            self.finish(metrics, ws.version_dir(folder.name))

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard is not installed: pip install 'incr-cli[tensorboard]'") from None
    return SummaryWriter
