# `make test` and `make demo` each set up their own virtualenv on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Persistent XLA compilation cache: compiles dominate test time on small CPUs. It lives in the user's cache
# directory, so every clone on a machine (CI's clean clones included) reuses what earlier runs compiled; entries
# are keyed by the program, the XLA flags and the jax/jaxlib versions, and the least recently used are evicted past
# 1 GB. Without a home directory it stays in the clone.
CACHE_HOME := $(if $(HOME),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/phi_jax,$(CURDIR)/.cache)
export JAX_COMPILATION_CACHE_DIR ?= $(CACHE_HOME)/jax
export JAX_COMPILATION_CACHE_MAX_SIZE ?= 1000000000
# torch is only for the parity tests. PyPI's Linux wheel of torch==2.13.0 is the CUDA build (gigabytes of CUDA
# libraries); where no CPU wheel is at hand, `make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes
# the CPU build from PyTorch's own index.
TORCH_INDEX ?=

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned (from TORCH_INDEX when given), so nothing resolves an unpinned (CUDA) torch.
	$(PY) -m pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

demo: venv
	$(PY) experiments/demo.py --workdir runs/demo

clean:
	# The virtualenv and the local compile cache only: runs/ holds training runs (checkpoints, params), removed by hand.
	rm -rf $(VENV) .cache
