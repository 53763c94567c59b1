# camlens developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format wheel-check bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/camlens explain --out camlens-out --overwrite

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check camlens tests benchmarks
	$(VENV)/bin/ruff format --check camlens tests benchmarks
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format camlens tests benchmarks
	$(VENV)/bin/ruff check --fix camlens tests benchmarks

# Build the wheel, install it (and nothing else from this checkout) into a fresh venv that borrows
# the dev venv's third-party packages, and run the default explanation from outside the repo.
wheel-check: $(STAMP)
	bash .ci/wheel-check

bench: $(STAMP)
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) camlens-out .pytest_cache build dist
