# Two commands set everything up in a virtual environment (.venv) and run:
#   make train   trains TiM4Rec on MovieLens-100K (shipped with RecBole); ARGS="--epochs=5"
#                passes options to run.py
#   make test    runs the test suite; ARGS="-q -x" passes options to pytest
# The package lists are the requirements*.txt files (environment.yaml reads the same ones).
# PYTHON=python3.12 picks the interpreter that creates the venv. Without a GPU, PyTorch's CPU-only
# build (no CUDA libraries): PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make train
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Each install leaves a stamp in the venv: later calls reinstall only after a list changed
# (make -B train forces it; deleting the venv starts again from nothing).
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

.PHONY: install install-dev install-gpu train test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# RecBole with --no-deps: requirements-recbole.txt says why
$(INSTALLED): requirements.txt requirements-recbole.txt | $(BIN)/python
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -r requirements-recbole.txt
	touch $@

$(INSTALLED_DEV): $(INSTALLED) requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

install: $(INSTALLED)

install-dev: $(INSTALLED_DEV)

# CUDA machines: mamba-ssm's Triton kernels, built against the installed torch
install-gpu: install
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	    $(PIP) install --no-build-isolation -r requirements-gpu.txt

train: install
	$(BIN)/python run.py $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
