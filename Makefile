# `make train` and `make test` each create/refresh .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test lint bench gpu-check gpu-wheels venv clean

venv: $(STAMP)

# Re-install only when the package metadata or pins change.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c requirements-cpu.txt -r requirements-cpu.txt
	$(VPY) -m pip install -q -c requirements-cpu.txt -e '.[test,bench]'
	touch $(STAMP)

train: $(STAMP)
	$(VPY) train.py $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q tests

# ruff (from the `test` extra) with the repository's ruff.toml.
lint: $(STAMP)
	$(VPY) -m ruff check .

# Every benchmark through pytest-benchmark (each skips without a GPU); ARGS go to pytest, e.g.
# ARGS="--benchmark-json=bench.json" (then `python -m bench.results --json bench.json`). docs/benchmarks.md.
bench: $(STAMP)
	$(VPY) -m pytest bench $(ARGS)

# The whole GPU validation as one command inside a time budget (bench/gpu_check.py). It never builds the
# venv (the GPU machine has no network): there it runs with that machine's python, `make gpu-check PY=python3`.
PY ?= $(if $(wildcard $(VPY)),$(VPY),python3)
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bench.gpu_check $(ARGS)

# The wheels the bare GPU machine lacks (gpu-check's environment stage names them), for its Python 3.12 on
# manylinux x86_64, into .whl/ (git-ignored), to carry with the device call (docs/benchmarks.md). Without
# their dependencies: list those too when a package has any outside the GPU image (brotli has none).
GPU_WHEELS ?= brotli
gpu-wheels:
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
