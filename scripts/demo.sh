#!/usr/bin/env bash
# `make demo`: adapt a real pretrained encoder (MiniLM-L6) from Austen to the Python docs, twice:
# with distillation + replay (incr's default increment) and as a plain fine-tune, then show what
# each version kept and learned. Every step is one `incr` command a user would type.
set -euo pipefail
INCR=${INCR:-.venv/bin/incr}
OUT=${DEMO_DIR:-demo-workspace}
STEPS1=${DEMO_STEPS1:-80}    # increment 1: train the MLM head + encoder on Austen
STEPS2=${DEMO_STEPS2:-50}    # increment 2: the Python docs
# Extra recipe overrides for every train-increment, e.g. DEMO_OVERRIDES="runtime.num_threads=1" on a busy machine.
WS=$OUT/minilm
NAIVE=$OUT/minilm-naive
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$INCR" init "$WS" --base minilm-l6 --recipe recipes/demo-minilm.yaml
step "$INCR" ingest "$WS" samples/austen.txt --name austen
step "$INCR" train-increment "$WS" train.steps="$STEPS1" ${DEMO_OVERRIDES:-}
step "$INCR" ingest "$WS" samples/pydocs.txt --name pydocs
# The same second increment as a plain fine-tune (no distillation, no replay), in a copy.
cp -a "$WS" "$NAIVE"
step "$INCR" train-increment "$WS" train.steps="$STEPS2" ${DEMO_OVERRIDES:-}
step "$INCR" train-increment "$NAIVE" train.steps="$STEPS2" strategy.name=naive ${DEMO_OVERRIDES:-}
step "$INCR" eval "$WS" --plot "$OUT/eval.png" --out "$OUT/eval.json"
step "$INCR" eval "$NAIVE" --out "$OUT/eval-naive.json"
step "$INCR" fill-mask "$WS" --versions v0001,v0002 \
  "She was too [MASK] to speak of her sister's engagement." \
  "The function returns a [MASK] of the arguments." \
  "Use the [MASK] statement to import a module." \
  "He had not the smallest [MASK] of marrying her."
"${PYTHON:-.venv/bin/python}" scripts/demo_compare.py "$OUT/eval.json" "$OUT/eval-naive.json"
seconds=$(( $(date +%s) - start ))
# what README's "the demo takes about N minutes" is read from (results/demo-run.json is a committed copy)
"${PYTHON:-.venv/bin/python}" - "$OUT/demo-run.json" "$seconds" "$STEPS1" "$STEPS2" <<'PY'
import json, os, platform, sys
out, seconds, steps1, steps2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "") if os.path.exists("/proc/cpuinfo") else ""
simd = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in flags), platform.machine())
json.dump({"seconds": seconds, "cores": len(os.sched_getaffinity(0)), "cpu": simd, "steps": [steps1, steps2],
           "overrides": os.environ.get("DEMO_OVERRIDES", "")}, open(out, "w"), indent=1)
PY
echo
echo "demo finished in $seconds s; the plot is $OUT/eval.png, the workspace $WS"
