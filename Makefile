# netmesh: `make demo` and `make test` work on a fresh Debian machine (as root).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup system-packages resolved-package test lint unit demo bench clean

setup: system-packages $(VENV)/.installed resolved-package

system-packages:
	@bash scripts/install-system-packages.sh

# systemd-resolved extracted (never installed) for tests/test_e2e_resolved.py.
resolved-package: $(VENV)/.installed
	@bash scripts/extract-resolved.sh $(VENV)/systemd-resolved

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy tests

# Everything: lint, types, unit, integration (real nats-server) and end-to-end
# (real wireguard-go in network namespaces; kernel WireGuard in a VM, about 5
# minutes of the run; skipped with a reason if not root).
test: lint
	$(BIN)/pytest -ra --durations=5

# Only the fast tests that need no root and no network namespaces.
unit: setup
	$(BIN)/pytest -ra -m "not netns"

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/cluster.py

demo: setup
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
