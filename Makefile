# The README's two commands: `make demo` and `make test`. Each sets up its own environment.
#
# The venv sees system site-packages so a machine that already has torch (the GPU image's
# torch 2.11 + CUDA) reuses it. Where no torch is importable we ask for torch==2.13.0, which on
# these machines is the CPU build lying on disk; never a bare `torch` that would pull a
# multi-GB CUDA wheel.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: env demo test test-fast aot bench gpu-check clean

$(VENV)/.staged-env: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import staged, staged.kernels; import torch; print('env ok: torch', torch.__version__)"
	touch $@

env: $(VENV)/.staged-env

# The demo's own stamp: the package and what the demo runs (the plot), not the test extras
# (trl, liger-kernel, datasets, ...). A venv that already has the test env serves both.
$(VENV)/.staged-demo: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -c "import staged, staged.kernels; import torch; print('demo env ok: torch', torch.__version__)"
	touch $@

demo: $(VENV)/.staged-demo
	$(PY) -m staged.train

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

# The GPU image's triton 3.6 as well: `python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install
# triton==3.6.0`, then `make aot AOT_TRITON=/tmp/t36/lib/python3.11/site-packages` (that triton
# shadows the venv's; torch stays the venv's).
AOT_TRITON ?=
aot: env
	env -u TRITON_INTERPRET $(if $(AOT_TRITON),PYTHONPATH=$(AOT_TRITON)) $(PY) -m staged.kernels.aot

bench: env
	$(PY) -m benchmarks --all

# `make gpu-check GPU_CHECK_ARGS=--dry-run` on a CPU: every step up to its CUDA calls.
# The GPU machines have torch/triton/transformers but no network: no venv, no dependency
# install; only this package itself, installed without deps or build isolation.
gpu-check:
	@P=$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)); \
	$$P -c "import staged.kernels" 2>/dev/null || $$P -m pip install -q --no-deps --no-build-isolation -e . ; \
	$$P -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info staged/_C*.so
