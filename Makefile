# dlcourse: the two set-up commands (`make demo`, `make test`) and a few helpers.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the real datasets live: a PATH-like list of folders, searched in order (see nbs/00_core.ipynb).
# Defaults: this workplace's Imagenette mirror beside the checkout, and Debian's Fashion-MNIST.
DLCOURSE_DATA ?= $(abspath ../shared/data):/usr/share/datasets
export DLCOURSE_DATA

.PHONY: demo test lab export bench bench-data help

help:
	@echo 'make demo   create .venv, install dlcourse, run dlcourse train on the bundled tiny Imagenette (outputs in demo_out/)'
	@echo "make test   create .venv with dev extras, check notebooks are clean and exported, run nbdev_test + pytest"
	@echo "make lab    open the notebooks in JupyterLab"
	@echo "make export nbdev_clean + nbdev_export (run before every commit)"
	@echo "make bench  the benchmarks in bench/ (make bench-data: the data pipeline against fastai, in its own venv)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The runtime install: what `pip install dlcourse` gives a user.
$(VENV)/.installed: $(BIN)/python setup.py settings.ini
	$(BIN)/pip install -q -e .
	touch $@

# The dev install: runtime + nbdev, pytest, JupyterLab.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

fashion-mnist:
	@tools/ensure_fashion_mnist.sh

demo: $(VENV)/.installed
	$(BIN)/dlcourse train --out demo_out

test: $(VENV)/.dev-installed fashion-mnist
	$(BIN)/python tools/run_tests.py

lab: $(VENV)/.dev-installed
	cd nbs && ../$(BIN)/jupyter lab

export: $(VENV)/.dev-installed
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

# Every benchmark that runs in the dev venv (GPU parts skip themselves without a GPU).
bench: $(VENV)/.dev-installed
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The data pipeline against fastai: fastai needs fastcore 2.x, so it gets a venv of its own.
bench/.venv-fastai/bin/python:
	$(PYTHON) -m venv bench/.venv-fastai
	bench/.venv-fastai/bin/pip install -q torch==2.14.1 torchvision==0.29.1 fastai==2.8.12
	bench/.venv-fastai/bin/pip install -q -e . --no-deps

bench-data: bench/.venv-fastai/bin/python
	bench/.venv-fastai/bin/python bench/data_pipeline.py --repeats 3
