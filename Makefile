# Two commands: `make run` (the embedded platform) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck pytest bench test-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build in pyproject; llama-cpp-python compiles once, then pip's cache serves it.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/inferatech up --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Two processes: most tests wait on a worker, a runner or a service, so two fill the two
# cores of a small host, and each takes one stack configuration (tests/conftest.py). In a slow
# phase of a 2-vCPU host: 13.9 min of tests, against ~36 min projected for one process.
TEST_JOBS ?= 2
pytest: $(VENV)/.installed
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadgroup --durations=15

test: lint typecheck pytest

bench: $(VENV)/.installed
	$(BIN)/pytest -q -s -m bench tests/bench -p no:randomly

# On a CUDA host only (a CUDA build of torch and llama-cpp-python); fails where there is none.
test-gpu: $(VENV)/.installed
	$(BIN)/pytest -q -m gpu tests/gpu -p no:randomly

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
