# qbook: the two set-up commands are `make book` and `make test` (see README.md).
# Both create/update a local virtual environment in $(VENV) with everything they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# A CPU-only machine must not download the multi-GB CUDA build of torch: unless a GPU is present (or the
# local pip configuration already provides a CPU wheel through find-links), torch comes from PyTorch's
# CPU wheel index.
TORCH_INDEX ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 || $(PYTHON) -m pip config list 2>/dev/null | grep -q find-links; \
                 then echo ""; else echo "--extra-index-url https://download.pytorch.org/whl/cpu"; fi)

# Determinism and offline operation for everything the targets run.
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export CUBLAS_WORKSPACE_CONFIG := :4096:8

NOTEBOOKS := $(sort $(wildcard book/[0-9][0-9]_*.ipynb))
STAMP     := $(VENV)/.qbook-installed

.PHONY: help venv book test test-portable bench-cpu unit nbval notebooks notebook lint dist clean

help:
	@echo "make book       build the book into _build/html (creates $(VENV) on first use)"
	@echo "make test       run all tests: unit tests, doctests and nbval over every notebook"
	@echo "make test-portable  nbval under other CPU kernel sets and thread counts (PORTABLE=\"default:1 avx2:2\")"
	@echo "make notebooks  re-execute every notebook in place (NB=book/03_x.ipynb for one)"
	@echo "make dist       build a wheel and an sdist of the package into dist/"
	@echo "make bench-cpu  qbook's CPU primitives against their peers (benchmarks/bench_cpu.py; ARGS=...)"
	@echo "make lint       ruff over the package, tests, benchmarks and notebooks"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo
	@echo "The book is built. Open it in a browser:"
	@echo "    file://$(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile qbook tests book --nbval --nbval-current-env

# The notebooks must reproduce on every reader's CPU, not only on the one that executed them: PyTorch picks its
# kernels by CPU capability (ATEN_CPU_CAPABILITY: default ~ generic/ARM-like, avx2, avx512) and splits work by
# thread count. Each variant CAPABILITY:THREADS re-runs nbval over every notebook under those settings.
PORTABLE ?= default:1 default:2 avx2:1 avx2:2

test-portable: $(STAMP)
	@set -e; for variant in $(PORTABLE); do \
	    cap=$${variant%%:*}; threads=$${variant##*:}; \
	    echo "== nbval with ATEN_CPU_CAPABILITY=$$cap, $$threads torch thread(s) =="; \
	    ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads MKL_NUM_THREADS=$$threads \
	        $(PY) -m pytest -q -n 2 --dist loadfile book --nbval --nbval-current-env; \
	done

# CPU speed of qbook against its peers (benchmarks/bench_cpu.py). torchao is one peer; it lives in a separate venv
# that sees the project's packages through a .pth file, because transformers imports torchao whenever it is
# installed and its import prints to stderr inside the notebooks.
BENCH_VENV ?= .venv-bench
bench-cpu: $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
	    "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/qbook-project-venv.pth"
	echo "$(CURDIR)" > "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/qbook-checkout.pth"
	$(BENCH_VENV)/bin/python -c "import torchao" 2>/dev/null || $(BENCH_VENV)/bin/pip install --quiet "torchao==0.18.0"
	$(BENCH_VENV)/bin/python benchmarks/bench_cpu.py $(ARGS)

unit: $(STAMP)
	$(PY) -m pytest -n 2 qbook tests

nbval: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile book --nbval --nbval-current-env

notebooks: $(STAMP)
	$(PY) -m nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3 \
	    $(if $(NB),$(NB),$(NOTEBOOKS))

notebook: notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check qbook tests benchmarks book

# A wheel and an sdist of the package in dist/, built offline with the environment's setuptools.
dist: $(STAMP)
	rm -rf build dist
	$(PY) -m build --no-isolation --outdir dist .
	@echo
	@echo "Install the package from the wheel:  pip install $$(ls dist/*.whl)"

clean:
	rm -rf _build .pytest_cache .hypothesis
