# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The torch build to install first (this machine's pip takes these from its local disk).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test test-slow test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	# TorchRay (test-only reference for extremal perturbation) declares dependencies it does not need here.
	$(PIP) install -q --no-deps torchray==1.0.0.2
	touch $@

demo: $(VENV)/.installed
	$(PY) -m jobs.demo --out runs/demo

# Default suite: everything not marked slow (about 15 minutes on a quiet 2-core CPU; an S3 server included; the two-node cluster job and the S3 kill/resume chain are in test-slow).
test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench.methods

clean:
	rm -rf $(VENV) runs .pytest_cache
