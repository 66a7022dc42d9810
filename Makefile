# runstate developer tasks. Needs only python3 (with venv) and make.
#   make install   create .venv and install runstate[dev,embedded,http,fast] (editable)
#   make test      run the test suite (without the chaos tests)
#   make chaos     run the chaos tests: Redis killed and paused, connections cut, load
#   make lint      ruff check, ruff format --check, mypy
#   make fmt       ruff format + ruff check --fix
#   make bench     run every bench/*.py
#   make demo      run `runstate demo`
#   make clean     remove caches and build output (distclean also drops .venv)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lint fmt test chaos bench demo clean distclean

install: $(STAMP)

# Re-runs only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e ".[dev,embedded,http,fast]"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy runstate workers

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install
	$(VPY) -m pytest -m "not chaos" $(PYTEST_ARGS)

# Each chaos test starts its own server and processes; -s shows the figures they print.
chaos: install
	$(VPY) -m pytest tests/chaos -m chaos -s $(PYTEST_ARGS)

bench: install
	@set -e; found=0; \
	for f in bench/*.py; do \
		[ -f "$$f" ] || continue; \
		found=1; echo ">>> $$f"; \
		$(VPY) "$$f"; \
	done; \
	[ $$found -eq 1 ] || echo "no benchmarks in bench/"

demo: install
	$(VENV)/bin/runstate demo

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache $(STAMP)
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -prune \
		-exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
