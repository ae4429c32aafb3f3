# rlgrid: `make demo` runs the main job on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit protos clean

install: $(STAMP)

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

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

protos: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf output .pytest_cache
