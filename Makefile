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

# The latency and soak benchmarks reuse the test harness (pytest, a real Orthanc):
# after the README's first command the test extras are added here. Needs dcmtk
# and orthanc on the PATH; takes a few minutes.
bench: install
	$(BIN)/python -c "import pytest" 2>/dev/null || $(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m bench.run_all
