# rtinfer: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EVENTS ?= 200000

.PHONY: demo test lint format bench clean

# The virtual environment, with the extras each target needs (re-installed when pyproject changes).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.demo

## demo: install rtinfer and run the live fraud-scoring demo on the embedded broker
demo: $(VENV)/.demo
	$(BIN)/rtinfer demo --events $(EVENTS)

## test: install the development extras and run the whole suite
test: $(VENV)/.dev
	$(BIN)/python -m pytest

## lint: ruff and mypy (strict on the package)
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: the benchmarks (print tables; run on an otherwise idle machine)
bench: $(VENV)/.dev
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
