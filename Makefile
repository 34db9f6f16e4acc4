# Two commands for a fresh clone on a fresh machine; each sets up what it needs in .venv first.
#   make run    the main job: scripts/train.py on real data that needs no download (tables + accuracy)
#   make test   lint and the whole test suite (what CI runs)
# Knobs (make VAR=value target, or VAR=value make target):
#   TORCH_INDEX=cpu    install torch and torchvision from PyTorch's CPU index first: no CUDA libraries (GBs less) on
#                      a machine without an NVIDIA GPU; also cu126 or any other of PyTorch's indexes, or a full URL
#   ARGS="..."         more flags for scripts/train.py (run, run-mnist), e.g. ARGS="--resume latest" to continue
#                      the last run, ARGS=--overwrite to start it afresh, ARGS="--epochs 5 --method rigl"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the real datasets beside the checkout (../shared/data), when they are there
DATAPATH ?= $(wildcard $(abspath ../shared/data))
TORCH_INDEX ?=
TORCH_INDEX_URL = $(if $(findstring ://,$(TORCH_INDEX)),$(TORCH_INDEX),https://download.pytorch.org/whl/$(TORCH_INDEX))
ARGS ?=
# pip, without setuptools' notice about editable installs of a package_dir layout (integrations/ is installed as
# dst_prune.integrations): that one message only, every other warning shows
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip

.PHONY: install run run-mnist quickstart test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
ifneq ($(TORCH_INDEX),)
	$(PIP) install torch torchvision --index-url $(TORCH_INDEX_URL)
else
	@if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "make: no NVIDIA GPU here (no nvidia-smi), but pip installs torch's default Linux build, with CUDA (GBs)."; \
	  echo "make: for the CPU build, stop (Ctrl-C) and run: TORCH_INDEX=cpu make $(or $(MAKECMDGOALS),install)"; \
	fi
endif
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/train.py $(if $(findstring --resume,$(ARGS)),,--overwrite) $(ARGS)

run-mnist: $(STAMP)
	DATAPATH="$(DATAPATH)" $(BIN)/python scripts/train.py --dataset mnist --epochs 5 --batch-size 100 $(ARGS)

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
