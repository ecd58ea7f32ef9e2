# ichnode developer targets. The README's two commands do the same without make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ichnode: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $@

.PHONY: install run test lint bench
install: $(BIN)/ichnode

run: install
	$(BIN)/ichnode serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python -m bench.run_all
