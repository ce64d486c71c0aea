"""`make stream`: a line of eight domains on MiniLM-L6, each method against a joint retrain.

    python scripts/stream.py [--lines default,naive,...] [--seeds K] [--quick] [--out-dir results]

The stream (built from ../shared/corpora, see ``DOMAINS``): Austen's *Emma*, the Python library
reference, quotations, the C API manual, Austen's *Persuasion* (a weak shift back to literature),
the tutorial, the "What's New" pages and the HOWTOs. Sizes differ as nights do (``DOCS``).

Protocol, the same for every line (recipes/experiment-minilm.yaml, ``train.seed`` = the seed):

1. shared: init v0000, ingest Emma, train it as a plain fine-tune for ``FIRST_STEPS`` steps (MiniLM
   ships without an MLM head: the first increment trains one; with no earlier data every method
   would do the same). One copy of this state per line.
2. per line: ingest and train the seven other domains in order, ``--steps`` steps each (40), with
   the line's overrides (``LINES``: the default recipe, naive, and one change each of the default).
3. joint: one retrain from v0000 on all eight domains with as many steps as a line (80 + 7 x 40),
   the end-of-stream reference; the compute a nightly joint retrain would have spent is the sum of
   such retrains at K = 1..8 domains (computed from the same step counts, not run).
4. score every version of every line on every domain's held-out text (the first
   ``eval.max_sequences``, seeded masks) and the final versions on the pydocs-sections task (a
   linear probe on mean-pooled embeddings); write OUT/stream.md, OUT/stream.png, OUT/stream.json.

``--quick`` runs the protocol on a tiny scratch model and excerpts of samples/ in about a minute
(the test suite uses it). Targets (issue 31) are checked in the report, met or not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _stream_report as report  # noqa: E402
from experiment import Log, add_domain, machine, train  # noqa: E402

from incr_cli.config.recipe import Recipe, TaskConfig, load_recipe, recipe_to_dict  # noqa: E402
from incr_cli.data.shards import split_batch_size  # noqa: E402
from incr_cli.model.weights import init_workspace  # noqa: E402
from incr_cli.runtime.device import CPU  # noqa: E402
from incr_cli.scoring.evaluate import EvalGrid, evaluate  # noqa: E402
from incr_cli.scoring.probe import TaskBook, load_tasks, score_versions  # noqa: E402
from incr_cli.store.files import finite_json  # noqa: E402
from incr_cli.store.workspace import Workspace  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "experiment-minilm.yaml"
CORPORA = REPO.parent / "shared" / "corpora"
TASK = REPO / "samples" / "tasks" / "pydocs-sections.jsonl"
# (name, corpus file, where its documents are): Austen by novel (line ranges of austen.txt, from the
# "By Jane Austen" title lines), the Python manuals by section (pydocs.txt is in section order; the
# ranges hold the section's paragraphs of ../shared/tasks/pydocs-sections.jsonl, 2nd to 98th percentile).
DOMAINS = [("emma", "austen.txt", (1, 2300)), ("library", "pydocs.txt", (6856, 28900)),
           ("quotes", "fortunes.txt", (0, 15155)), ("c-api", "pydocs.txt", (96, 2390)),
           ("persuasion", "austen.txt", (5081, 6081)), ("tutorial", "pydocs.txt", (30956, 31656)),
           ("whatsnew", "pydocs.txt", (32300, 38158)), ("howto", "pydocs.txt", (4517, 6287))]
DOCS = [900, 1500, 2500, 600, 500, 420, 1200, 700]  # documents per domain: nights differ in size
FIRST_STEPS, STEPS = 80, 40
HELDOUT = ["data.heldout_fraction=0.15", "data.heldout_min_docs=64"]  # room for merge.choose's rows past eval's
# Each line: strategy and overrides on top of the recipe (the default is replay+distill as shipped).
LINES: dict[str, list[str]] = {
    "default": [],
    "naive": ["strategy.name=naive"],
    "split=increment": ["replay.split=increment"],
    "merge.choose": ["merge.choose=true", "merge.weight=0.5"],
    "schedule=wsd": ["train.schedule=wsd", "train.decay_ratio=0.2"],
    "replay.ratio=0.5": ["replay.ratio=0.5", "replay.weight=1.0", "distill.alpha=1.0"],
    "replay.ratio=0.5+wsd": ["replay.ratio=0.5", "replay.weight=1.0", "distill.alpha=1.0", "train.schedule=wsd",
                             "train.decay_ratio=0.2"],
}
# what `make stream` runs by default (about 50 minutes on 2 cores): the combined line is asked for by name
DEFAULT_LINES = ["default", "naive", "split=increment", "merge.choose", "schedule=wsd", "replay.ratio=0.5"]
QUICK = {"base": "scratch:tiny", "first": 3, "steps": 2, "docs": 60,
         "overrides": ["train.batch_size=8", "train.lr=1e-3", "eval.max_sequences=8", "eval.batch_size=16",
                       "data.heldout_fraction=0.2", "data.heldout_min_docs=8", "runtime.num_threads=1",
                       "merge.sequences=4"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", default=",".join(DEFAULT_LINES),
                        help=f"Comma list of {', '.join(LINES)} (default: all but the last).")
    parser.add_argument("--steps", type=int, default=STEPS, help="Steps per increment after the first (40).")
    parser.add_argument("--seeds", type=int, default=1, help="Repeat with train.seed 0..K-1 (tables: mean).")
    parser.add_argument("--first-seed", type=int, default=0, help="Start the seeds here (FIRST..FIRST+K-1).")
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="Also report the seeds of this earlier stream.json (other seeds, any lines).")
    parser.add_argument("--corpora", type=Path, default=CORPORA, help="Folder of austen.txt, pydocs.txt, fortunes.txt.")
    parser.add_argument("--texts", type=Path, default=None,
                        help="Train these domains instead: DIR/NN-NAME.txt in name order, one document a line "
                             "(scripts/outside_texts.py writes such a folder).")
    parser.add_argument("--quick", action="store_true", help="A tiny scratch model on excerpts of samples/ (tests).")
    parser.add_argument("--no-tasks", action="store_true", help="Skip the pydocs-sections probe of the final versions.")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results")
    parser.add_argument("--name", default="stream", help="Stem of the files written: NAME.md, NAME.png, NAME.json.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep the workspaces here (default: removed).")
    parser.add_argument("--threads", type=int, default=None, help="runtime.num_threads of every run (default: all cores).")
    parser.add_argument("--no-joint", action="store_true",
                        help="Skip the joint retrain (its seed's joint must come with --add).")
    parser.add_argument("--report-only", action="store_true",
                        help="Train nothing: write the report of the --add files' seeds (merged).")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.lines = [s.strip() for s in args.lines.split(",") if s.strip()]
    if not args.lines or [s for s in args.lines if s not in LINES]:
        parser.error(f"--lines: choose from {', '.join(LINES)}")
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be at least 1")
    return args


def domain_files(args: argparse.Namespace, folder: Path) -> list[tuple[str, Path]]:
    """Write each domain's documents (every k-th of its range, DOCS of them) to folder/NAME.txt;
    with ``--texts``, that folder's files as they are."""
    if args.texts:
        files = sorted(args.texts.glob("*.txt"))
        if len(files) < 2:
            raise SystemExit(f"stream: {args.texts} holds {len(files)} .txt files; a line needs at least 2")
        return [(f.stem.split("-", 1)[-1], f) for f in files]
    folder.mkdir(parents=True, exist_ok=True)
    source = REPO / "samples" if args.quick else args.corpora
    out = []
    for k, ((name, file, (lo, hi)), n) in enumerate(zip(DOMAINS, DOCS)):
        path = source / file
        if not path.is_file():
            raise SystemExit(f"stream: {path} is missing; pass --corpora DIR (the folder of austen.txt, pydocs.txt, "
                             "fortunes.txt: ../shared/corpora on the project's machines)")
        lines = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        if args.quick:  # samples/ holds excerpts: a slice of each per domain
            n = QUICK["docs"]
            lo, hi = (k * n) % max(1, len(lines) - n), (k * n) % max(1, len(lines) - n) + n
        chosen = lines[lo:hi]
        stride = max(1, len(chosen) // n)
        text = "\n".join(chosen[::stride][:n]) + "\n"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        out.append((name, folder / f"{name}.txt"))
    return out


def run_line(name: str, shared: Path, work: Path, domains: list[tuple[str, Path]], recipe_for: Any,
             log: Log) -> dict[str, Any]:
    """Domains 2..8 into a copy of the shared state with the line's recipe -> workspace and per-increment metrics."""
    ws = Workspace(shared).copy_to(work / name.replace("=", "-").replace(".", "-"))
    recipe = recipe_for(LINES[name])
    increments = []
    for domain in domains[1:]:
        add_domain(ws, *domain, recipe, log)
        version, seconds = train(ws, recipe, log)
        increments.append(_increment_record(ws, version, seconds, recipe))
    return {"workspace": ws, "increments": increments}


def _increment_record(ws: Workspace, version: str, seconds: float, recipe: Recipe) -> dict[str, Any]:
    """What the report needs of one trained increment; ``compute``: student tokens (forward and backward)
    plus a third of the tokens the teacher ran forward on (the replayed rows, distill.rows=replay)."""
    m = json.loads((ws.version_dir(version) / "metrics.json").read_text(encoding="utf-8"))
    n_new, n_replay = split_batch_size(recipe.train.batch_size, recipe.replay.ratio, bool(m["data"]["replay"]),
                                       recipe.replay.on_top)
    distilled = m["loss"].get("distill") is not None
    teacher = m["tokens"] * (n_replay / (n_new + n_replay) if recipe.distill.rows == "replay" else 1.0) if distilled else 0
    return {"version": version, "wall_seconds": round(seconds, 1), "train_seconds": m["train_seconds"],
            "steps": m["steps"], "tokens": m["tokens"], "teacher_tokens": round(teacher),
            "compute": round(m["tokens"] + teacher / 3), "replay_rows": m["data"].get("replay_rows") or {},
            "replay_split": m["data"].get("replay_split"), "merge": m.get("merge")}


def run_joint(shared: Path, work: Path, domains: list[tuple[str, Path]], recipe_for: Any, steps: int,
              log: Log) -> dict[str, Any]:
    """All eight domains retrained from v0000 in one increment with as many steps as a line."""
    ws = Workspace(shared).copy_to(work / "joint")
    base = recipe_for([])
    for domain in domains[1:]:
        add_domain(ws, *domain, base, log)
    recipe = recipe_for(["strategy.name=joint"], steps)
    version, seconds = train(ws, recipe, log)
    return {"workspace": ws, "increments": [_increment_record(ws, version, seconds, recipe)]}


def score(ws: Workspace, recipe: Recipe, cache: Path, log: Log) -> dict[str, Any]:
    """Every version of LATEST's lineage after v0000 on every domain -> the perplexity matrix."""
    versions = ws.lineage(ws.latest())[1:]
    increments = ws.increments()
    if cache.is_dir():
        shutil.copytree(cache, ws.eval_dir / "cache", dirs_exist_ok=True)
    result = evaluate(ws, EvalGrid(versions, increments), recipe, reporter=log)
    shutil.copytree(ws.eval_dir / "cache", cache, dirs_exist_ok=True)
    matrix = [[result.scores[v][d]["perplexity"] for d in increments] for v in versions]
    return {"versions": versions, "increments": increments, "perplexity": matrix}


def task_scores(ws: Workspace, recipe: Recipe, log: Log) -> dict[str, Any] | None:
    """The final version's pydocs-sections probe (macro accuracy with its interval)."""
    spec = TaskConfig(name="pydocs-sections", path=str(TASK), kind="classification", group_field="source")
    probed = replace(recipe, eval=replace(recipe.eval, tasks=[spec]))
    version = ws.latest()
    scores = score_versions(TaskBook(ws, probed, CPU), [version], load_tasks(probed), reporter=log)
    s = scores[version]["pydocs-sections"]
    return {"version": version, "accuracy": s.get("accuracy"), "ci": s.get("accuracy_ci") or s.get("ci")}


def run_seed(seed: int, args: argparse.Namespace, work: Path, log: Log) -> dict[str, Any]:
    mode = QUICK if args.quick else {"base": "minilm-l6", "first": FIRST_STEPS, "steps": args.steps,
                                     "overrides": []}
    overrides = [*HELDOUT, *mode["overrides"], f"train.seed={seed}",
                 *([f"runtime.num_threads={args.threads}"] if args.threads else [])]

    def recipe_for(extra: list[str], steps: int | None = None) -> Recipe:
        return load_recipe(RECIPE, [*overrides, f"train.steps={steps or mode['steps']}", *extra])

    domains = domain_files(args, work / "texts")
    shared_dir = work / "shared"
    init_workspace(shared_dir, mode["base"], recipe_for([]), reporter=log)
    shared = Workspace.open(shared_dir)
    add_domain(shared, *domains[0], recipe_for([]), log)
    _, first_seconds = train(shared, recipe_for(["strategy.name=naive"], mode["first"]), log)
    total_steps = mode["first"] + mode["steps"] * (len(domains) - 1)
    runs = {name: run_line(name, shared_dir, work, domains, recipe_for, log) for name in args.lines}
    if not args.no_joint:
        runs["joint"] = run_joint(shared_dir, work, domains, recipe_for, total_steps, log)
    cache, base = work / "eval-cache", recipe_for([])
    out = {}
    for name, run in runs.items():
        out[name] = {**score(run["workspace"], base, cache, log), "increments": run["increments"]}
        if not args.no_tasks:
            out[name]["task"] = task_scores(run["workspace"], base, log)
    return {"lines": out, "first_seconds": round(first_seconds, 1), "total_steps": total_steps,
            "steps": mode["steps"], "first_steps": mode["first"], "domains": [d for d, _ in domains],
            "docs": [sum(1 for line in p.open(encoding="utf-8") if line.strip()) for _, p in domains],
            "recipe": recipe_to_dict(base), "batch_size": base.train.batch_size, "seq_len": base.model.max_seq_len}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = Log(args.quiet)
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="incr-stream-"))
    if args.work_dir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        numbers = [] if args.report_only else range(args.first_seed, args.first_seed + args.seeds)
        seeds = [{**run_seed(seed, args, work / f"seed{seed}", log), "seed": seed} for seed in numbers]
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    for path in args.add:  # earlier runs' seeds (and the minutes they took) join the report
        earlier = json.loads(path.read_text(encoding="utf-8"))
        for number, raw in zip(earlier["settings"]["seeds"], earlier["seeds_raw"]):
            raw.setdefault("seed", number)
            same = next((x for x in seeds if x["seed"] == raw["seed"]), None)
            if same is None:
                seeds.append(raw)
            else:  # the same seed, other lines: one seed's lines together (this run's first)
                same["lines"] = {**raw["lines"], **same["lines"]}
        seconds += earlier["settings"]["total_seconds"]
    seeds.sort(key=lambda s: s["seed"])
    doc = report.summarise(seeds)
    lines = list(dict.fromkeys(name for s in seeds for name in s["lines"] if name != "joint"))
    doc["settings"] = {"base": "scratch:tiny" if args.quick else "minilm-l6", "quick": args.quick,
                       "seeds": [s["seed"] for s in seeds], "lines": {n: LINES[n] for n in lines},
                       "recipe_file": str(RECIPE.relative_to(REPO)), "heldout": HELDOUT,
                       "machine": machine(), "total_seconds": round(seconds, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / args.name
    out.with_suffix(".json").write_text(json.dumps(finite_json(doc), indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(report.markdown(doc), encoding="utf-8")
    report.plot(doc, out.with_suffix(".png"))
    log.log(f"wrote {out}.md, .png and .json in {doc['settings']['total_seconds']:.0f} s")
    if not args.quiet:
        print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
