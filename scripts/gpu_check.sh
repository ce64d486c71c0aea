#!/usr/bin/env bash
# The GPU check for the first lent GPU: CUDA-marked tests, a real MiniLM increment in bf16 from the
# demo data, and what `make bench-gpu` runs, within --budget seconds (default 480), into one JSON
# (default gpu-check/gpu-check.json). Details: scripts/gpu_check.py. Needs incr installed with a CUDA
# torch: `make install` after installing the CUDA torch into .venv, or PYTHON=/path/to/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" scripts/gpu_check.py --python "$PYTHON" "$@"
