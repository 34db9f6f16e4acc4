# Two commands for a fresh clone on a fresh machine; each sets up what it needs in .venv first.
#   make run    the main job: scripts/train.py on real data that needs no download (tables + accuracy)
#   make test   lint and the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the real datasets beside the checkout (../shared/data), when they are there
DATAPATH ?= $(wildcard $(abspath ../shared/data))

.PHONY: install run run-mnist quickstart test test-fast lint clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/train.py --overwrite

run-mnist: $(STAMP)
	DATAPATH="$(DATAPATH)" $(BIN)/python scripts/train.py --dataset mnist --epochs 5 --batch-size 100

quickstart: $(STAMP)
	$(BIN)/python scripts/quickstart.py

lint: $(STAMP)
	$(BIN)/python -m ruff check .

test: lint
	DATAPATH="$(DATAPATH)" $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	DATAPATH="$(DATAPATH)" $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
