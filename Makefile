# Two commands on a fresh machine with python3 and make:
#   make demo   # create .venv, install with the example extras, run the main example
#   make test   # create .venv, install with the test extras, run ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint format bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when pyproject.toml changes: both commands are idempotent.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $@

$(VENV)/.installed-examples: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/train_digits.py

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check bn_jax tests examples
	$(VENV)/bin/ruff format --check bn_jax tests examples

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix bn_jax tests examples
	$(VENV)/bin/ruff format bn_jax tests examples

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) -m bn_jax.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
