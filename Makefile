# Every target bootstraps .venv itself (Python 3.11 + pip), so `make test` works on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all test test-unit lint types proto proto-check demo bench clean

all: test

# Debian packages the tests and the lab use (installed only when missing, and only as root).
DEB_PACKAGES := iproute2 iputils-ping

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (the project needs Python 3.11)"; exit 1; }
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "note: missing Debian packages:$$missing (root tests need them)"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[lab,test,dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests tools benchmarks
	$(BIN)/ruff format --check proxy tests tools benchmarks

types: $(STAMP)
	$(BIN)/mypy

# Everything this machine can run: lint, types, unit, integration and e2e (root needed for the last two).
test: lint types
	$(BIN)/pytest

# The unit tests alone: no root, no network namespaces.
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Regenerate proxy/api/ from proto/ (tests/unit/test_api_generated.py checks they agree).
proto: $(STAMP)
	$(BIN)/python tools/genproto.py

demo: $(STAMP)
	@echo "make demo arrives with the lab topology (issue 6); for now run: make test"

# Figures, not pass/fail (root: throw-away network namespaces). See benchmarks/README.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.reconcile

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
