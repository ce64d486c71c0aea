"""Training speed with Chinese whole-word masking: segmentation stored at ingest (on) vs not (off).

    .venv/bin/python benchmarks/bench_wwm.py [--steps 30] [--repeats 3] [--threads 1]

Two lines on the same tiny Chinese-capable BERT (scripts/make_zh_base.py, hidden 64) and the same
``samples/chinese.txt``, both trained with ``masking.whole_word=true``: "on" was ingested with
whole-word masking, so jieba's word boundaries are stored beside the shards and every batch reads
them; "off" was ingested without, so masking uses the vocabulary's markers only (single
characters). The runs alternate on/off ``--repeats`` times and the median tokens/s of each is
reported (train_seconds from metrics.json: the step loop only, no eval). Prints one line per run
and the ratio; writes bench-results/wwm.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_zh_base import write_zh_base  # noqa: E402

from incr_cli.config.recipe import load_recipe  # noqa: E402
from incr_cli.data.ingest import IngestOptions, ingest  # noqa: E402
from incr_cli.line.increment import train_increment  # noqa: E402
from incr_cli.model.weights import init_workspace  # noqa: E402
from incr_cli.store.workspace import Workspace  # noqa: E402


def _line(root: Path, base: Path, segmented: bool) -> Workspace:
    recipe = load_recipe(REPO / "recipes" / "cpu-tiny.yaml", ["masking.whole_word=true"])
    init_workspace(root, str(base), recipe)
    ws = Workspace.open(root)
    with ws.lock("ingest"):
        recipe = load_recipe(ws.recipe_path, [f"masking.whole_word={str(segmented).lower()}"])
        ingest(ws, [str(REPO / "samples" / "chinese.txt")], recipe=recipe, options=IngestOptions(name="zh"))
    assert bool(ws.increment_manifest(ws.increments()[0]).get("words")) == segmented
    return ws


def _tokens_per_second(ws: Workspace, args: argparse.Namespace, run: int) -> tuple[float, float]:
    """-> (tokens per wall second of the step loop, tokens per CPU second of the whole run).

    On a shared machine the wall clock swings with other load; CPU seconds of this process do not
    (they include the small before/after eval, the same work for both lines)."""
    branch = ws.copy_to(ws.root.parent / f"{ws.root.name}-run{run}")
    overrides = [f"train.steps={args.steps}", "train.batch_size=16", "runtime.save_every=100000",
                 f"runtime.num_threads={args.threads}", "eval.max_sequences=8"]
    cpu = time.process_time()
    with branch.lock("train-increment"):
        result = train_increment(branch, load_recipe(branch.recipe_path, overrides))
    cpu = time.process_time() - cpu
    return result.metrics["tokens"] / result.metrics["train_seconds"], result.metrics["tokens"] / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = write_zh_base(Path(tmp) / "base", (REPO / "samples" / "chinese.txt").read_text(encoding="utf-8"))
        lines = {"on": _line(Path(tmp) / "on", base, True), "off": _line(Path(tmp) / "off", base, False)}
        rates: dict[str, list[float]] = {"on": [], "off": [], "on_cpu": [], "off_cpu": []}
        for run in range(args.repeats):
            for name, ws in lines.items():
                wall, cpu = _tokens_per_second(ws, args, run)
                rates[name].append(wall)
                rates[f"{name}_cpu"].append(cpu)
                print(f"run {run} segmentation {name}: {wall:,.0f} tokens/s (wall, step loop), "
                      f"{cpu:,.0f} tokens per CPU second", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {"wall": median["on"] / median["off"], "cpu": median["on_cpu"] / median["off_cpu"]}
    print(f"median tokens/s: on {median['on']:,.0f}, off {median['off']:,.0f}; on/off = {ratio['wall']:.3f}; "
          f"per CPU second: on {median['on_cpu']:,.0f}, off {median['off_cpu']:,.0f}; on/off = {ratio['cpu']:.3f}")
    out = REPO / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "wwm.json").write_text(json.dumps({"rates": rates, "median": median, "ratio": ratio,
                                              "args": vars(args)}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
