# Every target sets itself up: a virtualenv in ./venv with requirements.txt.
# `make setup` (and so `make test`) also installs the Debian packages the
# tests call when they are missing, if run as root; otherwise it stops with
# the apt-get line to run (tools/system-packages). The other targets need
# only the virtualenv.
PYTHON ?= python3
VENV ?= venv
PY := $(VENV)/bin/python

.PHONY: all setup packages test lint demo demo-cluster adaptive bench chaos fuzz clean

all: test

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

packages:
	@sh tools/system-packages

setup: packages $(VENV)/.installed

NOSEARGS ?=
test: setup
	$(VENV)/bin/nosetests -v $(NOSEARGS) tests

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade), then
# mypy over the servers and the client (both configured in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy server siegetank

# The main job on one machine: embedded Redis, dev certs, CC, WS, cores.
demo: setup
	$(PY) -m tools.demo

# The researcher's example: 3 replicates of adaptive sampling against plain
# MD with real OpenMM cores (about 14 minutes on 2 shared cores); the
# replicate table, plots and an MSM land in data/adaptive/.
adaptive: $(VENV)/.installed
	$(PY) -m tools.adaptive_demo

# The same job on two CC processes sharing one embedded Redis; one CC is
# SIGKILLed mid-run and the job completes through the other.
demo-cluster: $(VENV)/.installed
	$(PY) -m tools.demo --cluster

# Benchmarks against a bare Tornado ceiling (several minutes); results and
# a plot land in bench/results/. `make bench BENCHARGS=--quick` smoke-runs it.
BENCHARGS ?=
bench: $(VENV)/.installed
	$(PY) -m bench $(BENCHARGS)

# Kill -9 at 1,000 points of a running CC + WS (workers, servers, their
# Redis) under load, checking after each that nothing acknowledged was lost
# (about an hour; not in CI). `make chaos CHAOSARGS="--points 100"`.
CHAOSARGS ?=
chaos: $(VENV)/.installed
	$(PY) -m tools.chaos $(CHAOSARGS)

# Generated requests from docs/openapi*.yaml against a real CC and WS:
# fails on any 5xx or traceback. `make fuzz FUZZARGS=--requests=500`.
FUZZARGS ?= --requests=10000
fuzz: $(VENV)/.installed
	$(PY) -m tools.fuzz $(FUZZARGS)

clean:
	rm -rf $(VENV) data *.egg-info
