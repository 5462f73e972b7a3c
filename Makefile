# Two commands on a fresh machine with python3 and make:
#   make demo   # create .venv, install with the example extras, run the main example
#   make test   # create .venv, install with the test and docs extras, run ruff and mypy, build the docs, run the tests;
#               # installs Debian's chromium and chromedriver for the browser test where it can (apt-get as
#               # root or with sudo without a password), else says what to install
#   make test BROWSER_TEST=0   # the same without the docs' browser test (no chromium needed)
#   make docs   # build the documentation site into docs/_build/html, warnings as errors
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2
BROWSER_TEST ?= 1

.PHONY: demo test browser docs lint format bench wheel-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when pyproject.toml changes: both commands are idempotent.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test,docs,examples]'
	# timm's FRN/EvoNorm layers are a test reference; its dependencies would
	# bring torchvision (see docs/design.md), so it comes without them.
	$(PY) -m pip install -q --no-deps timm==1.0.31
	touch $@

$(VENV)/.installed-examples: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

demo: $(VENV)/.installed-examples
	$(PY) examples/train_digits.py

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check bn_jax tests examples benchmarks
	$(VENV)/bin/ruff format --check bn_jax tests examples benchmarks
	$(VENV)/bin/mypy bn_jax

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff check --fix bn_jax tests examples benchmarks
	$(VENV)/bin/ruff format bn_jax tests examples benchmarks

# Pages' code cells are executed; notebooks keep their stored outputs.
docs: $(VENV)/.installed-test
	$(PY) -m sphinx -j 2 -W --keep-going -q -b html docs docs/_build/html

# The browser test opens the site built by `docs` in chromium; it must run here,
# not skip. `browser` installs chromium and chromedriver where they are missing
# and this user can (apt-get), else stops with what to install.
ifeq ($(BROWSER_TEST),0)
test: lint docs
	$(PY) -m pytest $(PYTEST_ARGS) --ignore=tests/test_docs_site.py
else
test: browser lint docs
	BN_JAX_REQUIRE_BROWSER=1 $(PY) -m pytest $(PYTEST_ARGS)
endif

browser:
	@.ci/browser

# Build the sdist and wheel, install the wheel into a fresh virtualenv, and run
# the README's quickstart there, outside the checkout (the core only: no Flax).
WHEEL_CHECK ?= build/wheel-check
wheel-check: $(VENV)/.installed-test
	rm -rf dist $(WHEEL_CHECK)
	$(PY) -m build -q --sdist --wheel --outdir dist . >/dev/null
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(PY) -m pip freeze --exclude-editable > $(WHEEL_CHECK)/constraints.txt  # the versions pip has cached
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q -c $(WHEEL_CHECK)/constraints.txt dist/bn_jax-*.whl
	$(PY) .ci/readme_block.py Quickstart > $(WHEEL_CHECK)/quickstart.py
	cd $(WHEEL_CHECK) && venv/bin/python -c "import bn_jax; print('bn_jax', bn_jax.__version__, bn_jax.__file__)"
	cd $(WHEEL_CHECK) && venv/bin/python quickstart.py > quickstart.out && cat quickstart.out
	grep -qF "prints \`$$(cat $(WHEEL_CHECK)/quickstart.out)\`" README.md  # what the README says

# The benchmarks live in benchmarks/ at the repository root, not in the package.
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis docs/_build dist build
