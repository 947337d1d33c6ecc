# gpuq — the two commands users run are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two install levels: what `make demo` needs (runtime), and on top of it what `make test` needs (lint and
# test tools, and the reference model's torch stack), so a newcomer's first `make demo` stays quick.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
# aws-sam-cli is big and pins its own world: it lives in a venv of its own outside the work tree, reused
# across clones (keyed on its version), so `make test` does not reinstall it on every run.
SAM_VERSION := 1.170.0
SAM_VENV := $(HOME)/.cache/gpuq/sam-$(SAM_VERSION)
SAM := $(SAM_VENV)/bin/sam

.PHONY: help venv lint fmt test test-fast test-only fuzz test-docker services sam-check demo bench bench-smoke soak schema-sql clean

help:
	@echo "make demo   - run the whole pipeline end to end on embedded defaults"
	@echo "make test   - lint + the whole test suite against real Redis and MariaDB"
	@echo "make test-fast - the tests not marked slow (no kill -9, restarts, soak, demo, bench)"
	@echo "make fuzz   - the property and fuzz tests, exploring (random seeds, many more examples)"
	@echo "make bench  - the load benchmark (gpuq vs Celery)"
	@echo "make test-docker - build the image, run the compose stack end to end, tear it down"

$(RUN_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(STAMP): $(RUN_STAMP) requirements-dev.txt reference/requirements.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -r reference/requirements.txt
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

services:
	bash infra/ensure-services.sh

$(SAM):
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --upgrade pip
	$(SAM_VENV)/bin/pip install -q aws-sam-cli==$(SAM_VERSION)

# `sam validate --lint` and `sam build`, then import the handler from the build folder alone. A checked build
# is reused while template.yaml and producer/ are unchanged (keyed on their contents: infra/sam-check.sh).
sam-check: $(SAM) $(STAMP)
	bash infra/sam-check.sh $(SAM) $(PY) $(SAM_VERSION)

# The whole pipeline on embedded defaults (SQLite, a Redis found or started, simulated GPUs); see demo/.
# Arguments through DEMO_ARGS, e.g. `make demo DEMO_ARGS="--jobs 1000 --gpus 8"`.
demo: $(RUN_STAMP)
	$(PY) -m demo $(DEMO_ARGS)

# The suite runs on PYTEST_WORKERS pytest-xdist workers: most of a test's time is spent waiting on the
# processes it started (dispatchers, simulated GPUs, servers), not on CPU, so 4 workers fit 2 cores. Each
# worker has its own Redis db and databases; tests marked `exclusive` run alone (tests/conftest.py).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS))

# Hypothesis runs derandomized here (profile ci, tests/conftest.py): the same examples on every run.
test: lint services sam-check
	bash infra/ensure-chromium.sh
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)
	$(MAKE) test-docker

# Everything but the tests marked slow (real processes killed, stopped or restarted, clock skew, soak,
# benchmarks, demo, docker): the quick check while working; `make test` runs all of it.
test-fast: $(STAMP) services
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The property and fuzz tests (marked fuzz) with random seeds and 20x the examples, failures kept in
# .hypothesis/ and replayed first next time; no per-test timeout. Turn what it finds into an @example.
fuzz: $(STAMP) services
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m fuzz --timeout=0 $(PYTEST_ARGS)

# The image and the compose stack, built and run: two dispatchers, MariaDB, Redis and simulated GPUs in
# containers, jobs pushed through the Lambda handler, each must finish exactly once, and `docker compose down`
# must leave nothing behind. Installs docker.io and starts dockerd when missing; builds its base images from
# Debian's packages when no registry is reachable (infra/local-images/). About 1 min once the images are
# cached, 7-9 min on a fresh (busy) machine; the timeout bounds a stuck build or engine.
test-docker:
	timeout 1500 bash infra/test-docker.sh

# The load benchmark (SPEC §8): gpuq vs Celery side by side; bench-only dependencies go into the venv.
# Arguments through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--profile"`; bench/RESULTS.md explains it.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

bench: $(BENCH_STAMP) services
	$(PY) -m bench --quiet-load 1.5 $(BENCH_ARGS)

# A few seconds of the same (gpuq side only unless Celery is installed); `make test` runs it as tests/bench.
bench-smoke: $(STAMP) services
	$(PY) -m pytest tests/bench -q

# The soak: 100,000 jobs through two dispatchers with a fault every 5 s, then the audit (bench/SOAK.md).
# Arguments through SOAK_ARGS, e.g. `make soak SOAK_ARGS="--jobs 10000 --fault-every 2"`; a ~1,000-job
# version runs in the suite (tests/faults/test_soak.py).
soak: $(STAMP) services
	$(PY) -m bench.soak $(SOAK_ARGS)

# The suite alone, for quick iterations when lint and SAM are known good.
test-only: $(STAMP) services
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# sql/schema.sql is dispatcher/db/schema.py rendered as MySQL DDL (tests/operators/test_sql.py checks it).
schema-sql: $(STAMP)
	$(PY) -m dispatcher.db.ddl sql/schema.sql

clean:
	rm -rf $(VENV) .aws-sam .mypy_cache .ruff_cache .pytest_cache .gpuq
