"""Cost as history grows: one increment of fixed size after 1, 5 and 20 earlier increments.

For each history length k a throwaway workspace (scratch:tiny) ingests k small earlier increments
(pydocs paragraphs), trains them into v0001 (a couple of steps: they only need to be in the
lineage), ingests the same fixed new increment (austen paragraphs) and runs ``train_increment`` on
it with the default strategy (distillation + replay from all k). Reported per k:

- train loop seconds and s/step (``metrics.train_seconds``): must stay flat as k grows;
- the replay sampler alone, ms per batch (``BatchSampler.next_batch`` over the k pools);
- the whole increment (wall seconds), which also scores the gate's sample of the lineage after
  training (bounded by ``eval.gate_sequences``; "before" comes from v0001's recorded scores);
  ``bench_history.py`` measures that part alone, up to 100 earlier increments;
- eval of one version row over all k + 1 increments (``incr_cli.scoring.evaluate.evaluate``, no cache),
  and that per cell.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _data import read_paragraphs

DOCS_PER_EARLIER = 40
NEW_DOCS = 200


def _overrides(threads: int, steps: int) -> list[str]:
    return [f"train.steps={steps}", "train.batch_size=8", "model.max_seq_len=64", "eval.max_sequences=16",
            "eval.batch_size=16", "runtime.save_every=0", f"runtime.num_threads={threads}",
            "runtime.device=cpu", "data.heldout_min_docs=2"]


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _sampler_ms(ws: Any, plan: Any, recipe: Any, batches: int = 200) -> float:
    from incr_cli.data.shards import BatchSampler, Draw, open_increment

    new = [open_increment(ws, d, verify=False) for d in plan.new]
    replay = [open_increment(ws, d, verify=False) for d in plan.replay]
    sampler = BatchSampler(new, replay, Draw(plan.new_per_batch, plan.replay_per_batch, seed=recipe.train.seed))
    started = time.perf_counter()
    for _ in range(batches):
        sampler.next_batch()
    return (time.perf_counter() - started) / batches * 1e3


def build_history(root: Path, k: int, *, threads: int, steps: int) -> Any:
    """A workspace whose LATEST (v0001) learned k earlier increments, with the fixed new increment pending."""
    from incr_cli.config.recipe import build_recipe
    from incr_cli.data.ingest import IngestOptions, ingest
    from incr_cli.line.increment import train_increment
    from incr_cli.model.weights import init_workspace
    from incr_cli.store.workspace import Workspace

    recipe = build_recipe({}, "bench-scaling", _overrides(threads, steps))
    init_workspace(root, "scratch:tiny", recipe)
    ws = Workspace(root)
    earlier = read_paragraphs(("pydocs.txt",))
    with ws.lock("bench"):
        for i in range(k):
            docs = earlier[i * DOCS_PER_EARLIER:(i + 1) * DOCS_PER_EARLIER]
            ingest(ws, [_write(root.parent / f"earlier-{i}.txt", docs)], recipe=recipe,
                   options=IngestOptions(name=f"earlier{i:02d}"))
        train_increment(ws, build_recipe({}, "bench-scaling", _overrides(threads, 2)))  # v0001 learns them
        new = read_paragraphs(("austen.txt",))[:NEW_DOCS]
        ingest(ws, [_write(root.parent / "new.txt", new)], recipe=recipe, options=IngestOptions(name="new"))
    return ws


def time_increment(pristine: Path, copy: Path, *, threads: int, steps: int) -> dict[str, Any]:
    """Train the pending increment in a fresh copy of ``pristine``, then score the new version's row."""
    from incr_cli.config.recipe import build_recipe
    from incr_cli.line.increment import train_increment
    from incr_cli.methods import plan_increment
    from incr_cli.scoring.evaluate import EvalGrid, evaluate
    from incr_cli.store.workspace import Workspace

    ws = Workspace(pristine).copy_to(copy)
    recipe = build_recipe({}, "bench-scaling", _overrides(threads, steps))
    with ws.lock("bench"):
        plan = plan_increment(ws, recipe)
        started = time.perf_counter()
        result = train_increment(ws, recipe)
        wall = time.perf_counter() - started
        sampler_ms = _sampler_ms(ws, plan, recipe)
        columns = ws.increments()
        started = time.perf_counter()
        evaluate(ws, EvalGrid([ws.latest()], columns), recipe, use_cache=False)
        eval_seconds = time.perf_counter() - started
    shutil.rmtree(copy, ignore_errors=True)
    m = result.metrics or {}
    return {"steps": m["steps"], "new_sequences": plan.new_sequences, "replay_sequences": plan.replay_sequences,
            "train_seconds": m["train_seconds"], "wall_seconds": wall, "sampler_ms_per_batch": sampler_ms,
            "eval_row_seconds": eval_seconds, "eval_columns": len(columns)}


def run(*, say: Any, threads: int = 1, histories: tuple[int, ...] = (1, 5, 20), steps: int = 40,
        repeats: int = 3) -> dict[str, Any]:
    """-> {"rows": [per history: medians over ``repeats`` interleaved runs], ...}.

    Each history is built once; every timed run trains a fresh copy of it, the histories taking turns
    (after one untimed warm-up run), so load elsewhere on the machine hits them alike. One thread by
    default: the tiny model gains nothing from more, and with other load on the machine thread
    synchronisation, not bookkeeping, would dominate its timings.
    """
    from incr_cli.runtime.device import configure_threads

    configure_threads(threads)
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in histories}
    with tempfile.TemporaryDirectory(prefix="incr-bench-scaling-") as tmp:
        roots = {}
        for k in histories:
            (Path(tmp) / f"k{k}").mkdir()
            roots[k] = build_history(Path(tmp) / f"k{k}" / "ws", k, threads=threads, steps=steps).root
        time_increment(roots[histories[0]], Path(tmp) / "warm-up", threads=threads, steps=steps)
        for r in range(repeats):
            for k in histories:
                runs[k].append(time_increment(roots[k], Path(tmp) / f"run-{k}-{r}", threads=threads, steps=steps))
    rows = []
    for k in histories:
        med = {key: statistics.median(x[key] for x in runs[k])
               for key in ("train_seconds", "wall_seconds", "sampler_ms_per_batch", "eval_row_seconds")}
        first = runs[k][0]
        row = {"earlier": k, **{key: first[key] for key in ("steps", "new_sequences", "replay_sequences",
                                                            "eval_columns")}, **med,
               "seconds_per_step": med["train_seconds"] / max(1, first["steps"]),
               "eval_seconds_per_cell": med["eval_row_seconds"] / first["eval_columns"]}
        say(f"  {k} earlier: loop {row['seconds_per_step']:.3f} s/step, sampler {row['sampler_ms_per_batch']:.3f} "
            f"ms/batch, whole increment {row['wall_seconds']:.1f} s, eval row {row['eval_row_seconds']:.2f} s")
        rows.append(row)
    first, last = rows[0], rows[-1]
    growth = last["seconds_per_step"] / first["seconds_per_step"] if first["seconds_per_step"] else None
    return {"model": f"scratch:tiny, seq 64, batch 8, {threads} thread(s)", "steps": steps, "repeats": repeats,
            "new_sequences": rows[0]["new_sequences"], "rows": rows, "loop_step_growth": growth,
            "note": (f"train-loop s/step with {last['earlier']} vs {first['earlier']} earlier increments: x{growth:.2f} "
                     "(flat = sampling and bookkeeping do not grow with history); the whole increment and the eval "
                     "row grow with the number of held-out splits scored, by design")}
