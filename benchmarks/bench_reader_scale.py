"""The training reader at scale: opening a long history and drawing batches from 10+ GB of packed rows.

    .venv/bin/python benchmarks/bench_reader_scale.py [--gb 10] [--increments 120] [--out results/reader-scale.json]

A throwaway workspace gets ``--increments`` increments of random packed rows (uint16, 128 tokens a
row) adding up to ``--gb`` GB, written as ingest writes them (train.bin, heldout.bin, a sealed
manifest). Then, for a history of k earlier increments (k = 1, 10, 50 and all but the newest), a
child process each (so memory and the page cache are its own):

- opens the k earlier increments and the newest as ``train-increment`` does (``open_increment``,
  manifests and file sizes verified, checksums from the workspace's verify cache) and builds the
  ``BatchSampler`` (``--new`` new rows and ``--replay`` replayed rows per micro-batch): seconds;
- draws ``--batches`` micro-batches: milliseconds per batch, first with the history's pages dropped
  from the page cache (when this user may drop them; root can) and then warm;
- reports its memory: peak RSS, and of the RSS at the end the anonymous part (the process's own
  memory, which must not grow with the history) and the file-backed part (mapped rows the kernel
  drops under pressure).

Both replay splits are measured (``size``: a row uniformly over all earlier rows; ``increment``: each
earlier increment the same share). Targets: at the longest history, ms per batch at most 1.5x that of
a one-increment history and anonymous memory within 50 MB of it. The first verification of the whole
history (every byte hashed once, then cached) is timed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ_LEN = 128
CHILD = "--child"


def write_history(root: Path, gb: float, increments: int, seed: int = 0) -> list[str]:
    """``increments`` increments of random rows adding up to ``gb`` GB (the newest is a night's share,
    the same size as the others) -> their ids, oldest first."""
    from incr_cli.store.workspace import Workspace, base_manifest, seal_folder

    ws = Workspace(root)
    ws.data.mkdir(parents=True, exist_ok=True)
    rows_each = max(2, int(gb * 1e9 / increments / (SEQ_LEN * 2)))
    heldout_rows = 64
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(increments):
        increment = ws.next_increment(f"night{i:03d}")
        with ws.staged_folder(ws.increment_dir(increment)) as tmp:
            with open(tmp / "train.bin", "wb") as f:
                for start in range(0, rows_each, 65536):
                    n = min(65536, rows_each - start)
                    rows = rng.integers(10, 30000, size=(n, SEQ_LEN), dtype=np.uint16)
                    rows[:, 0] = 2  # [CLS]
                    rows.tofile(f)
            heldout = rng.integers(10, 30000, size=(heldout_rows, SEQ_LEN), dtype=np.uint16)
            heldout.tofile(tmp / "heldout.bin")
            seal_folder(tmp, base_manifest(
                "increment", id=increment, name=f"night{i:03d}", seq_len=SEQ_LEN, dtype="uint16", pad_id=0,
                vocab_size=30522, tokenizer_sha256=None, sources=[],
                documents={"kept": rows_each + heldout_rows, "heldout": heldout_rows},
                sequences={"train": rows_each, "heldout": heldout_rows},
                tokens={"train": rows_each * SEQ_LEN, "heldout": heldout_rows * SEQ_LEN}))
        ids.append(increment)
    return ids


def _drop_page_cache(paths: list[Path]) -> bool:
    """Evict these files' pages (posix_fadvise DONTNEED: no root needed); True when the call worked."""
    ok = True
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def _memory() -> dict[str, int]:
    """This process's RSS split (bytes) from /proc/self/status: peak, anonymous, file-backed."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return {"peak_rss": fields.get("VmHWM", 0), "anon_rss": fields.get("RssAnon", 0),
            "file_rss": fields.get("RssFile", 0)}


def _warm_page_cache(paths: list[Path]) -> None:
    """Read the files once, start to end, so their pages are in the page cache (and not mapped here)."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def child(root: Path, k: int, split: str, reader: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (in its own process): open k earlier increments + the newest, draw batches.
    ``reader``: "pread" (what incr does) or "mmap" (indexing the memory map, for comparison)."""
    from incr_cli.data.shards import BatchSampler, Draw, open_increment
    from incr_cli.store.workspace import Workspace

    ws = Workspace(root)  # a history only: no version, so not a workspace `incr` opens
    increments = ws.increments()
    earlier, new = increments[: k], increments[-1:]
    started = time.perf_counter()
    with ws.verifying_many():
        shards = [open_increment(ws, d) for d in [*earlier, *new]]
    if reader == "mmap":
        shards = [dataclasses.replace(s, train_file=None) for s in shards]
    sampler = BatchSampler(shards[-1:], shards[:-1], Draw(args.new, args.replay, seed=0, split=split))
    opened = time.perf_counter() - started
    files = [ws.increment_dir(d) / "train.bin" for d in [*earlier, *new]]
    timings = {}
    for phase in ("cold", "warm"):
        ok = _drop_page_cache(files) if phase == "cold" else _warm_page_cache(files) is None
        started = time.perf_counter()
        rows = 0
        for _ in range(args.batches):
            batch = sampler.next_batch()
            rows += len(batch.new_ids) + len(batch.replay_ids)
        timings[phase] = (time.perf_counter() - started) / args.batches * 1000 if ok else None
    return {"k": k, "split": split, "reader": reader, "history_gb": sum(f.stat().st_size for f in files[:-1]) / 1e9,
            "open_seconds": opened, "ms_per_batch_cold": timings["cold"], "ms_per_batch_warm": timings["warm"],
            "rows_per_batch": rows // args.batches, **_memory()}


def measure(root: Path, k: int, split: str, reader: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, CHILD, str(root), str(k), split, reader, "--new", str(args.new), "--replay",
           str(args.replay), "--batches", str(args.batches)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_verification(root: Path) -> dict[str, Any]:
    """Every increment verified once from scratch (every byte hashed; then cached by stat) and again."""
    from incr_cli.store.workspace import Workspace

    ws = Workspace(root)  # a history only: no version, so not a workspace `incr` opens
    (ws.staging / "verify-cache.json").unlink(missing_ok=True)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        with ws.verifying_many():
            for d in ws.increments():
                ws.verify_increment(d)
        times.append(time.perf_counter() - started)
    return {"first_seconds": times[0], "cached_seconds": times[1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=10.0, help="GB of packed rows in all (10).")
    parser.add_argument("--increments", type=int, default=120, help="Increments in the history (120).")
    parser.add_argument("--sizes", default=None, help="History lengths k (default 1,10,50,increments-1).")
    parser.add_argument("--new", type=int, default=32, help="New rows per micro-batch (32).")
    parser.add_argument("--replay", type=int, default=32, help="Replayed rows per micro-batch (32: ratio 0.5 on top).")
    parser.add_argument("--batches", type=int, default=2000, help="Micro-batches drawn per phase (2000).")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the history (default: a temp dir).")
    parser.add_argument("--out", type=Path, default=None, help="Write the results here as JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        root, k, split, reader = Path(argv[1]), int(argv[2]), argv[3], argv[4]
        print(json.dumps(child(root, k, split, reader, parse_args(argv[5:]))))
        return 0
    args = parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")} if args.sizes else
                   {1, 10, 50, args.increments - 1} & set(range(1, args.increments)))
    where = Path(tempfile.mkdtemp(prefix="incr-reader-", dir=args.dir))
    try:
        started = time.perf_counter()
        write_history(where / "ws", args.gb, args.increments)
        written = time.perf_counter() - started
        print(f"wrote {args.increments} increments ({args.gb:g} GB) in {written:.0f} s", flush=True)
        verify = first_verification(where / "ws")
        rows = []
        for split, reader in (("size", "pread"), ("size", "mmap"), ("increment", "pread")):
            for k in sizes:
                row = measure(where / "ws", k, split, reader, args)
                rows.append(row)
                print(f"{reader:5s} split={split:9s} k={k:4d} ({row['history_gb']:6.2f} GB): "
                      f"open {row['open_seconds']:6.2f} s, "
                      f"{row['ms_per_batch_warm']:.3f} ms/batch warm, "
                      f"{row['ms_per_batch_cold'] or float('nan'):.3f} cold, anon {row['anon_rss'] / 1e6:.0f} MB, "
                      f"file {row['file_rss'] / 1e6:.0f} MB, peak {row['peak_rss'] / 1e6:.0f} MB", flush=True)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    result = {"benchmark": "reader-scale", "gb": args.gb, "increments": args.increments, "seq_len": SEQ_LEN,
              "new": args.new, "replay": args.replay, "batches": args.batches, "write_seconds": written,
              "verify": verify, "rows": rows,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cores": len(os.sched_getaffinity(0))}, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
