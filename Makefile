# bn_research: `make run` installs and trains the quickstart; `make test` installs and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Quickstart: Ioffe & Szegedy (2015) sec. 4.1 MLP with batch norm on the embedded MNIST digits.
run: install
	$(BIN)/bn-research train --config configs/mlp.py:norm=batch --workdir runs/quickstart_mlp_bn --overwrite

test: install
	$(BIN)/ruff check bn_research tests configs experiments benchmarks
	$(BIN)/pytest -n 2 tests

lint: install
	$(BIN)/ruff check bn_research tests configs experiments benchmarks

bench: install
	$(PY) -m pip install -q torch==2.13.0
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs
