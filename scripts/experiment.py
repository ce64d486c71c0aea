"""`make experiment`: every continual-learning strategy on one stream of three real domains.

    python scripts/experiment.py [--steps N] [--seeds K] [--quick] [--out-dir results] [--work-dir DIR]

The stream is austen -> pydocs -> fortunes (samples/), on MiniLM-L6 (``--base minilm-l6``) with
recipes/experiment-minilm.yaml. Protocol, the same for every strategy:

1. init v0000, ingest austen, train it as a plain fine-tune (v0001): shared by all strategies, since
   with no earlier data they would all do the same, except the distillation ones, which would
   distill from MiniLM's untrained (random) MLM head; then ingest pydocs. One copy of this state per
   strategy.
2. per strategy: train pydocs (v0002), ingest fortunes, train fortunes (v0003), ``train.steps``
   steps per increment; joint retrains all k domains from v0000 with k x steps (the same steps
   per domain of data as the sequential lineage has had: its cost grows with the stream).
3. score every version on every domain with ``incr_cli.scoring.evaluate`` (one eval cache shared by the
   copies, so the shared versions are scored once), summarise with ``incr_cli.scoring.continual.summarize``,
   write OUT/experiment.md (tables), OUT/experiment.png (plot) and OUT/experiment.json (everything).

4. ``--seeds K`` (3, the documented setting) repeats 1-3 with ``train.seed`` = 0 .. K-1 (sampling,
   masks, dropout; the eval masks and MiniLM's head initialisation stay fixed) and reports each
   summary as mean and sample standard deviation over the seeds; the matrices and the plot are
   seed 0's, every seed's summaries are in the JSON.

Everything is seeded (sampling, masks, dropout, eval masks); a rerun on the same machine gives the
same numbers, wall times aside. ``--quick`` runs the same protocol on a tiny scratch model and
excerpts of the samples in seconds (the test suite uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _experiment_report as report  # noqa: E402

from incr_cli.config.recipe import Recipe, load_recipe, recipe_to_dict  # noqa: E402
from incr_cli.data.ingest import IngestOptions, ingest  # noqa: E402
from incr_cli.line.increment import train_increment  # noqa: E402
from incr_cli.model.weights import init_workspace  # noqa: E402
from incr_cli.scoring.continual import summarize  # noqa: E402
from incr_cli.scoring.evaluate import EvalGrid, evaluate  # noqa: E402
from incr_cli.store.files import finite_json  # noqa: E402
from incr_cli.store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "experiment-minilm.yaml"
DOMAINS = [("austen", "austen.txt"), ("pydocs", "pydocs.txt"), ("fortunes", "fortunes.txt")]
STRATEGIES = ["naive", "replay", "distill", "replay+distill", "ewc", "joint"]
SHARED_FIRST = "naive"  # how the shared first increment is trained (see the module docstring)
QUICK_LINES = 240  # lines of each sample in --quick
QUICK = {"base": "scratch:tiny", "steps": 3,
         "overrides": ["train.batch_size=8", "train.lr=1e-3", "eval.max_sequences=16", "eval.batch_size=16",
                       "ewc.fisher_batches=2", "data.heldout_fraction=0.1", "data.heldout_min_docs=4",
                       "runtime.num_threads=1"]}
FULL = {"base": "minilm-l6", "steps": None, "overrides": []}


class Log:
    """A Reporter that prints one timestamped line per message (readable in a nohup log)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", flush=True)

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")

    def table(self, title: str, columns: Any, rows: Any) -> None:
        pass

    def progress(self, description: str, total: float | None, unit: str = "") -> Any:
        from incr_cli.progress import Quiet

        return Quiet().progress(description, total, unit)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="Steps per increment (default: the recipe's train.steps).")
    parser.add_argument("--seeds", type=int, default=3,
                        help="Repeat with train.seed 0..K-1; the tables give mean and spread (default 3).")
    parser.add_argument("--quick", action="store_true", help="A tiny scratch model on excerpts, a few steps (tests).")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results", help="Where the table, plot and JSON go.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Keep the workspaces here (default: a temporary folder, removed at the end).")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="Comma list (default: all six).")
    parser.add_argument("--threads", type=int, default=None,
                        help="runtime.num_threads for every run (default: the recipe's, i.e. all cores).")
    parser.add_argument("--quiet", action="store_true", help="Print nothing but errors.")
    args = parser.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


# ----------------------------------------------------------------------------- the runs


def domain_files(quick: bool, folder: Path) -> list[tuple[str, Path]]:
    """(name, file) of the three domains; --quick writes the first QUICK_LINES lines of each."""
    if not quick:
        return [(name, REPO / "samples" / file) for name, file in DOMAINS]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, file in DOMAINS:
        lines = (REPO / "samples" / file).read_text(encoding="utf-8").splitlines()[:QUICK_LINES]
        path = folder / file
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append((name, path))
    return out


def add_domain(ws: Workspace, name: str, path: Path, recipe: Recipe, log: Log) -> str:
    with ws.lock("ingest"):
        result = ingest(ws, [str(path)], recipe=recipe, options=IngestOptions(name=name), reporter=log)
    if result.increment is None:
        raise SystemExit(f"experiment: ingesting {path} wrote nothing: {result.message}")
    log.log(f"ingested {result.increment}: {result.sequences}")
    return result.increment


def train(ws: Workspace, recipe: Recipe, log: Log) -> tuple[str, float]:
    """One train-increment (the gate is off in the experiment recipe) -> (version, wall seconds)."""
    started = time.perf_counter()
    with ws.lock("train-increment"):
        result = train_increment(ws, recipe, reporter=log)
    seconds = time.perf_counter() - started
    if result.version is None or not result.promoted:
        raise SystemExit(f"experiment: {ws.root} trained nothing: {result.message}")
    loss = (result.metrics or {}).get("loss", {})
    log.log(f"{ws.root.name}: {result.version} in {seconds:.1f} s, final losses "
            + ", ".join(f"{k} {v:.3f}" for k, v in loss.items() if v is not None))
    return result.version, seconds


def run_strategy(name: str, shared: Path, work: Path, third: tuple[str, Path], recipe_for: Any,
                 steps: int, log: Log) -> dict[str, Any]:
    """Increments 2 and 3 of one strategy in its own copy of the shared state."""
    ws = Workspace(shared).copy_to(work / name.replace("+", "-"))
    seconds = []
    for i in (2, 3):
        if i == 3:
            add_domain(ws, *third, recipe_for("naive", steps), log)
        # joint retrains every domain so far: k domains get k x steps
        n = steps * (len(ws.trained_on(ws.latest())) + len(ws.pending(ws.latest()))) if name == "joint" else steps
        _, s = train(ws, recipe_for(name, n), log)
        seconds.append(s)
    return {"workspace": ws, "train_seconds": seconds}


def score(ws: Workspace, recipe: Recipe, cache: Path, log: Log) -> dict[str, Any]:
    """Every version of LATEST's lineage on every domain, through a cache shared by the copies."""
    versions = ws.lineage(ws.latest())
    increments = ws.increments()
    if cache.is_dir():
        shutil.copytree(cache, ws.eval_dir / "cache", dirs_exist_ok=True)
    result = evaluate(ws, EvalGrid(versions, increments), recipe, reporter=log)
    shutil.copytree(ws.eval_dir / "cache", cache, dirs_exist_ok=True)
    log.log(f"{ws.root.name}: scored {len(versions)} versions x {len(increments)} domains "
            f"({result.cache_hits} cached) in {result.seconds:.1f} s")
    return summarise(ws, versions, increments, result.scores)


def summarise(ws: Workspace, versions: list[str], increments: list[str],
              scores: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Matrices (versions x domains) and their continual-learning summaries.

    ``learned_at[j]`` is the first version whose lineage contains domain j (joint retrains j later
    too, but it learned j there first, so forgetting is measured from the same row for everyone).
    """
    trained = [set(ws.trained_on(v)) for v in versions]
    learned_at = [next((i for i, t in enumerate(trained) if inc in t), -1) for inc in increments]
    out: dict[str, Any] = {"versions": versions, "increments": increments, "learned_at": learned_at}
    for metric, higher in (("perplexity", False), ("accuracy", True)):
        R = np.array([[np.nan if scores[v][d][metric] is None else scores[v][d][metric] for d in increments]
                      for v in versions], dtype=np.float64)
        summary = summarize(R, learned_at, higher_is_better=higher)
        just_learned = [R[row, j] for j, row in enumerate(learned_at) if row >= 2]  # the strategy's own increments
        out[metric] = {"matrix": R.tolist(), **summary.to_dict(increments),
                       "new_domain": float(np.mean(just_learned)) if just_learned else None}
    return out


def run_seed(seed: int, args: argparse.Namespace, overrides: list[str], steps: int, work: Path,
             log: Log) -> tuple[dict[str, Any], float]:
    """Steps 1-3 of the protocol with ``train.seed=seed`` in ``work`` -> ({strategy: results}, shared seconds)."""
    mode = QUICK if args.quick else FULL
    seeded = [*overrides, f"train.seed={seed}"]
    base_recipe = load_recipe(RECIPE, seeded)

    def recipe_for(strategy: str, n: int) -> Recipe:
        return load_recipe(RECIPE, [*seeded, f"strategy.name={strategy}", f"train.steps={n}"])

    domains = domain_files(args.quick, work / "texts")
    shared_dir = work / "shared"
    log.log(f"seed {seed}: init {shared_dir} from {mode['base']}; {steps} steps per increment")
    init_workspace(shared_dir, mode["base"], recipe_for(SHARED_FIRST, steps), reporter=log)
    shared = Workspace.open(shared_dir)
    add_domain(shared, *domains[0], base_recipe, log)
    _, first_seconds = train(shared, recipe_for(SHARED_FIRST, steps), log)
    add_domain(shared, *domains[1], base_recipe, log)
    runs = {name: run_strategy(name, shared_dir, work, domains[2], recipe_for, steps, log) for name in args.strategies}
    cache = work / "eval-cache"
    results = {name: {**score(run["workspace"], base_recipe, cache, log), "train_seconds": run["train_seconds"]}
               for name, run in runs.items()}
    return results, first_seconds


SPREAD_KEYS = (("perplexity", "final_average"), ("perplexity", "average_forgetting"), ("perplexity", "bwt"),
               ("perplexity", "new_domain"), ("accuracy", "final_average"), ("accuracy", "average_forgetting"))


def spread(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """{strategy: {"metric.key": {mean, std (sample; 0 for one seed), values}}} over the seeds'
    results, for the summaries of SPREAD_KEYS, each domain's final perplexity and the train time."""
    out: dict[str, Any] = {}
    for name in per_seed[0]:
        values: dict[str, list[float]] = {}
        for results in per_seed:
            r = results[name]
            for metric, key in SPREAD_KEYS:
                values.setdefault(f"{metric}.{key}", []).append(r[metric][key])
            for domain, ppl in zip(r["increments"], r["perplexity"]["matrix"][-1]):
                values.setdefault(f"final_perplexity.{domain}", []).append(ppl)
            values.setdefault("train_seconds", []).append(sum(r["train_seconds"]))
        out[name] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                         "values": v} for k, v in values.items() if None not in v}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    overrides = [*mode["overrides"], *([f"runtime.num_threads={args.threads}"] if args.threads else [])]
    log = Log(args.quiet)
    started = time.perf_counter()
    base_recipe = load_recipe(RECIPE, overrides)
    steps = args.steps or mode["steps"] or base_recipe.train.steps
    seeds = list(range(args.seeds))

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="incr-experiment-"))
    if args.work_dir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    per_seed, shared_seconds = [], []
    try:
        for seed in seeds:  # seed 0 in WORK itself (what --work-dir keeps), the others beside it
            results, first = run_seed(seed, args, overrides, steps, work if seed == 0 else work / f"seed{seed}", log)
            per_seed.append(results)
            shared_seconds.append(first)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    settings = {
        "base": mode["base"], "quick": args.quick, "domains": [d for d, _ in DOMAINS],
        "steps_per_increment": steps, "shared_first_increment": SHARED_FIRST, "seeds": seeds,
        "recipe": recipe_to_dict(base_recipe), "recipe_file": str(RECIPE.relative_to(REPO)),
        "overrides": overrides, "machine": machine(),
        "shared_seconds": round(shared_seconds[0], 1), "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "strategies": per_seed[0], "spread": spread(per_seed),
           "per_seed": {str(seed): {name: {k: v for k, v in r.items() if k in ("perplexity", "accuracy",
                                                                                "train_seconds")}
                                    for name, r in results.items()} for seed, results in zip(seeds, per_seed)}}
    (args.out_dir / "experiment.json").write_text(json.dumps(finite_json(doc), indent=2) + "\n", encoding="utf-8")
    (args.out_dir / "experiment.md").write_text(report.markdown(doc), encoding="utf-8")
    report.plot(doc, args.out_dir / "experiment.png")
    log.log(f"wrote {args.out_dir / 'experiment.md'}, experiment.png and experiment.json "
            f"in {settings['total_seconds']:.0f} s")
    if not args.quiet:
        print(report.markdown(doc))
    return 0


def machine() -> dict[str, Any]:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(main())
