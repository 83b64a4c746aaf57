# Two commands set everything up in a virtual environment (.venv) and run:
#   make train   trains TiM4Rec on MovieLens-100K (shipped with RecBole); ARGS="--epochs=5" passes options
#   make test    runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev train test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# RecBole goes in without its dependencies: they are in requirements.txt, less its pinned ray.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps recbole==1.2.1

install-dev: install
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt

train: install
	$(BIN)/python run.py $(ARGS)

test: install-dev
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
