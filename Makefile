# Two commands on a fresh machine: `make run` (the main job) and `make test` (the tests).
# Both create .venv with Python 3.11 and install the project on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-slow test-all bench bench-continual bench-classification bench-pipeline pretrain stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev,kfp]'
	# animal-mnist's declared dependency (tensorflow) is not needed: data files only.
	$(PY) -m pip install -q --no-deps 'animal-mnist==0.4'
	@rm -f $(VENV)/.installed-* && touch $@

## The main job: embedded stack up, a whole tiny concept sequence via `ray job submit`.
run: install
	$(VENV)/bin/stamina run-local

## Fast + integration tests (CI). Slow suites: `make test-slow`.
test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m "slow" -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/overhead.py

bench-continual: install
	for m in stamina lora_seq clora textual_inversion; do $(PY) bench/continual.py --method $$m --concepts 50 --seeds 0,1,2 || exit 1; done

bench-classification: install
	$(PY) bench/classification.py --methods stamina,lora_seq,clora,seq_ft,head_only,joint --tasks 10 --seeds 0,1,2 --steps 100 --lr 3e-4 --head_learning_rate 1e-2 --ft_learning_rate 1e-4 --clora_weight 1e5 --mask_sparsity 0.1 --mask_learning_rate 0.1

bench-pipeline: install
	$(PY) bench/pipeline_overhead.py

pretrain: install
	$(VENV)/bin/stamina pretrain-tiny

stack-up: install
	$(VENV)/bin/stamina stack up

stack-down: install
	$(VENV)/bin/stamina stack down

clean:
	rm -rf .stamina
