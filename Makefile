# camlens developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: constraints setup demo test test-fast lint format wheel-check bench clean browser

$(STAMP): pyproject.toml requirements-dev.txt requirements-yolo.txt constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-yolo.txt -c constraints-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/camlens explain --out camlens-out --overwrite

test: $(STAMP) browser
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
	$(PY) -m pip install -q -r requirements-bench.txt -c constraints-dev.txt
	$(PY) -m benchmarks

# Debian's Chromium and chromedriver for the real-browser test of `camlens serve` (tests/serve/test_serve_browser.py).
# Instant when installed; CI runs as root on a fresh machine. Where they cannot be installed (no apt, not
# root) this says so and the browser test is skipped with the reason.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
		|| echo "note: could not install Chromium; the browser test will be skipped"; \
	else echo "note: Chromium not installed (needs root and apt-get); the browser test will be skipped"; fi

clean:
	rm -rf $(VENV) camlens-out .pytest_cache build dist

# the full pinned environment (pip constraints) from the current .venv
constraints: $(STAMP)
	{ head -3 constraints-dev.txt; $(PY) -m pip freeze | grep -v '^-e\|^camlens\|@ file'; } > constraints-dev.tmp && mv constraints-dev.tmp constraints-dev.txt
