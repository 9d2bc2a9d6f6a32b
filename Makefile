# `make train` and `make test` each create/refresh .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test lint bench venv clean

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

bench: $(STAMP)
	for f in bench/*.py; do $(VPY) $$f || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
