# `make demo` and `make test` each set up .venv from nothing, then run (`make test` lints first).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this disk, never a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/farm demo --out demo-out

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff's lint and format checks over everything, mypy over the light side (pyproject.toml)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check farm workers tests bench
	$(VENV)/bin/ruff format --check farm workers tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
