# The README's commands. Every target is idempotent: a second run reuses .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-installed

.PHONY: setup quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/posttrain train recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/grpo_step.py
	$(BIN)/python benchmarks/episode_step.py
	$(BIN)/python benchmarks/dpo_sft_step.py
	$(BIN)/python benchmarks/rewards_bench.py

clean:
	rm -rf $(VENV) runs
