# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench docs docs-serve clean

# (Re)install when pyproject.toml changes; pip only, so this machine's pip
# configuration (local CPU/CUDA torch wheels) is honoured.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/colearn

test: $(STAMP)
	$(BIN)/python -m pytest

# The documentation site (MkDocs + Material + mkdocstrings), built with warnings as errors;
# `make test` builds it too (tests/test_docs.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/python bench/cohort_throughput.py

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache site
