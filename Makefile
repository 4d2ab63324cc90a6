# The Makefile owns the environment recipe: torch is pinned to the CPU build on disk, and
# kronfluence goes in with --no-deps because its torchvision requirement breaks beside this
# torch (and transformers with it); its real needs are listed in pyproject.toml. tox-block and
# toxic-comment-classifier go in with --no-deps too: their TensorFlow code is never run, ifguide reads their LSTM
# weights (scorers jigsaw-lstm and toxic-comment-classifier).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ifguide-setup
export IFGUIDE_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench lint clean gpu-bundle

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1
	$(BIN)/pip install -q --no-deps tox-block==0.1.2  # only its weights are used (scorer jigsaw-lstm); never imported
	$(BIN)/pip install -q --no-deps toxic-comment-classifier==0.3.0  # weights only (scorer toxic-comment-classifier)
	@! $(BIN)/pip show -q torchvision 2>/dev/null || { echo "torchvision must stay out of $(VENV)"; exit 1; }
	touch $(STAMP)

demo: setup
	$(BIN)/ifguide demo $(if $(RUN),--run $(RUN),)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

test-fast: setup  # the tests not marked slow (the ones that train several models): the edit-run loop
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_influence.py --factor-fraction 0.25  # every block tracked (paper), factors on 25%
	$(BIN)/python benchmarks/bench_influence.py --last-layers 1 --factor-fraction 0.0625  # demo preset
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_prepare.py  # 10M and 100M synthetic tokens: tokens/s and peak memory
	$(BIN)/python benchmarks/bench_errors.py  # seconds until a user mistake is reported (goal < 1 s)
	@if [ -d runs/demo ]; then $(BIN)/python benchmarks/bench_selection_quality.py --run runs/demo && \
	$(BIN)/python benchmarks/bench_rad.py --run runs/demo && \
	$(BIN)/python benchmarks/bench_throughput.py --run runs/demo; \
	else echo "bench_selection_quality.py, bench_rad.py and bench_throughput.py need a demo run: make demo first"; fi

# benchmarks/gpu_check.py on a bare GPU machine (torch, transformers, accelerate there; no internet): the wheels it
# lacks, for CPython 3.12, and the mirror files the quick run reads, into .gpu/ (about 25 MB). README, "GPU check".
GPU_WHEELS := kronfluence==1.0.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 \
	alt-profanity-check==1.9.1 scikit-learn==1.9.1 einconv==0.1.0

gpu-bundle: setup
	rm -rf .gpu && mkdir -p .gpu/wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu/wheels $(GPU_WHEELS)
	$(BIN)/python benchmarks/gpu_check.py --bundle-data .gpu/data
	du -sh .gpu

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
