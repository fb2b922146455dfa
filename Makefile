# Every target sets itself up: a virtualenv in ./venv with requirements.txt.
PYTHON ?= python3
VENV ?= venv
PY := $(VENV)/bin/python

.PHONY: all setup test lint demo demo-cluster adaptive bench chaos fuzz clean

all: test

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

NOSEARGS ?=
test: setup
	$(VENV)/bin/nosetests -v $(NOSEARGS) tests

# pyflakes, pycodestyle and import order (configured in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .

# The main job on one machine: embedded Redis, dev certs, CC, WS, cores.
demo: setup
	$(PY) -m tools.demo

# The researcher's example: 3 replicates of adaptive sampling against plain
# MD with real OpenMM cores (about 14 minutes on 2 shared cores); the
# replicate table, plots and an MSM land in data/adaptive/.
adaptive: setup
	$(PY) -m tools.adaptive_demo

# The same job on two CC processes sharing one embedded Redis; one CC is
# SIGKILLed mid-run and the job completes through the other.
demo-cluster: setup
	$(PY) -m tools.demo --cluster

# Benchmarks against a bare Tornado ceiling (several minutes); results and
# a plot land in bench/results/. `make bench BENCHARGS=--quick` smoke-runs it.
BENCHARGS ?=
bench: setup
	$(PY) -m bench $(BENCHARGS)

# Kill -9 at 1,000 points of a running CC + WS (workers, servers, their
# Redis) under load, checking after each that nothing acknowledged was lost
# (about an hour; not in CI). `make chaos CHAOSARGS="--points 100"`.
CHAOSARGS ?=
chaos: setup
	$(PY) -m tools.chaos $(CHAOSARGS)

# Generated requests from docs/openapi*.yaml against a real CC and WS:
# fails on any 5xx or traceback. `make fuzz FUZZARGS=--requests=500`.
FUZZARGS ?= --requests=10000
fuzz: setup
	$(PY) -m tools.fuzz $(FUZZARGS)

clean:
	rm -rf $(VENV) data *.egg-info
