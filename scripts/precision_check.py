"""Is bf16 accurate enough? The demo's line (MiniLM-L6, recipes/demo-minilm.yaml, Austen then the
Python docs) trained once per precision, every version scored in fp32 on every increment.

    python scripts/precision_check.py run --precision fp32 --work /tmp/pc      # then --precision bf16
    python scripts/precision_check.py compare /tmp/pc/fp32.json /tmp/pc/bf16.json [--out results/precision-check.json]

``run`` uses the same `incr` commands as scripts/demo.sh (``--steps`` to shorten them) and writes
WORK/PRECISION.json: each version's training figures and its held-out perplexity per increment,
scored in fp32 (so only the training precision differs) and at the training precision. ``compare``
prints, per version and increment, bf16's perplexity relative to fp32's and whether it is within
``--tolerance`` (default 2%), and exits 1 when any is not; ``--out`` keeps both runs and the verdict
(docs/performance.md's bf16 table is rendered from results/precision-check.json, scripts/doc_tables.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def incr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "incr_cli", *args], cwd=REPO, check=True)


def scores(ws: Path, precision: str, out: Path) -> dict[str, dict[str, float]]:
    incr("eval", str(ws), f"runtime.precision={precision}", "--out", str(out))
    doc = json.loads(out.read_text(encoding="utf-8"))
    return {v: {inc: cell["perplexity"] for inc, cell in row.items()} for v, row in doc["matrix"].items()}


def run(args: argparse.Namespace) -> int:
    ws = args.work / f"ws-{args.precision}"
    over = [f"runtime.precision={args.precision}", *args.overrides]
    s1, s2 = args.steps
    incr("init", str(ws), "--base", "minilm-l6", "--recipe", str(REPO / "recipes" / "demo-minilm.yaml"))
    incr("ingest", str(ws), str(REPO / "samples" / "austen.txt"), "--name", "austen")
    incr("train-increment", str(ws), f"train.steps={s1}", *over)
    incr("ingest", str(ws), str(REPO / "samples" / "pydocs.txt"), "--name", "pydocs")
    incr("train-increment", str(ws), f"train.steps={s2}", *over)
    versions = {}
    for v in ("v0001", "v0002"):
        m = json.loads((ws / "checkpoints" / v / "metrics.json").read_text(encoding="utf-8"))
        versions[v] = {k: m.get(k) for k in ("precision", "precision_choice", "steps", "tokens", "train_seconds",
                                             "tokens_per_second", "peak_memory_bytes", "loss")}
    doc = {"precision": args.precision, "steps": args.steps, "overrides": args.overrides, "versions": versions,
           "perplexity_fp32_eval": scores(ws, "fp32", args.work / f"eval-{args.precision}-fp32.json"),
           "perplexity_own_eval": scores(ws, args.precision, args.work / f"eval-{args.precision}-own.json")}
    out = args.work / f"{args.precision}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def compare(args: argparse.Namespace) -> int:
    ref, new = (json.loads(p.read_text(encoding="utf-8")) for p in (args.reference, args.candidate))
    worst, ok = 0.0, True
    for key in ("perplexity_fp32_eval", "perplexity_own_eval"):
        print(f"{key}: {new['precision']} / {ref['precision']} - 1")
        for v, row in ref[key].items():
            for inc, p_ref in row.items():
                rel = new[key][v][inc] / p_ref - 1.0
                within = abs(rel) <= args.tolerance
                ok &= within or key != "perplexity_fp32_eval"
                worst = max(worst, abs(rel)) if key == "perplexity_fp32_eval" else worst
                print(f"  {v} {inc:14s} {p_ref:9.3f} {new[key][v][inc]:9.3f} {rel:+.2%} {'ok' if within else 'OVER'}")
    for v in ref["versions"]:
        a, b = ref["versions"][v], new["versions"][v]
        print(f"{v}: train {a['train_seconds']:.1f} s -> {b['train_seconds']:.1f} s "
              f"(x{a['train_seconds'] / b['train_seconds']:.2f}), peak memory {a['peak_memory_bytes'] / 2**30:.2f} -> "
              f"{b['peak_memory_bytes'] / 2**30:.2f} GiB")
    print(f"largest |change| (fp32 eval): {worst:.2%}; {'within' if ok else 'NOT within'} {args.tolerance:.0%}")
    if args.out:
        doc = {"reference": ref, "candidate": new, "tolerance": args.tolerance, "largest_change": worst, "within": ok}
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the demo line at one precision and score it")
    r.add_argument("--precision", choices=["fp32", "bf16"], required=True)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[80, 50],
                   help="steps of the two increments (default 80,50 as the demo)")
    r.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. runtime.num_threads=1")
    c = sub.add_parser("compare", help="bf16 vs fp32 per version and increment")
    c.add_argument("reference", type=Path)
    c.add_argument("candidate", type=Path)
    c.add_argument("--tolerance", type=float, default=0.02)
    c.add_argument("--out", type=Path, default=None, help="Write both runs and the verdict as JSON here.")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
