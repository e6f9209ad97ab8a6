# The two commands of the README. Each creates .venv on first use (torch's CPU build first, so
# pip never pulls a CUDA build) and is quick when run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

demo: $(STAMP)
	$(PY) -m microadam_dist.demo

test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# ruff format, then the lint rules (E, F, I); make test checks both
lint: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,demo,triton,mpi,deepspeed]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
