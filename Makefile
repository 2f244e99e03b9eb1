# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch+torchvision first: on this project's machines the pair below installs from local disk.
# Elsewhere pick the pair for your platform, e.g. make test TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PLUGINS := $(wildcard plugins/*/pyproject.toml)
STAMP := $(VENV)/.sarkit-installed

.PHONY: setup test test-all demo lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev,deepspeed]"
	for p in $(dir $(PLUGINS)); do $(PIP) install -q -e $$p || exit 1; done
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check sarkit plugins tests bench
	$(VENV)/bin/pytest

# everything, the long training runs (marked slow) too: about 25 min on 2 cores
test-all: setup
	$(VENV)/bin/ruff check sarkit plugins tests bench
	$(VENV)/bin/pytest -m ""

demo: setup
	$(VENV)/bin/sarkit demo -o demo-out

lint: setup
	$(VENV)/bin/ruff check sarkit plugins tests bench
	$(VENV)/bin/ruff format --check sarkit plugins tests bench

format: setup
	$(VENV)/bin/ruff format sarkit plugins tests bench
	$(VENV)/bin/ruff check --fix sarkit plugins tests bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache
