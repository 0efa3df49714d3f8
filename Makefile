# weightstore developer and CI entry points.
#
#   make test      install (if pyproject.toml changed), system packages (if missing), run pytest
#   make serve     run the service (embedded SeaweedFS + SQLite unless configured otherwise)
#   make lint      ruff check, ruff format --check, mypy, hadolint, README module map (CI runs it before test)
#   make bench     run every benchmarks/bench_*.py in turn
#   make cluster   the deploy/ topology as local processes (PostgreSQL, SeaweedFS cluster, HAProxy,
#                  2 API replicas, 2 collectors, 2 export workers), in the foreground; Ctrl-C stops it
#
# Tests start their own SeaweedFS and PostgreSQL (tests/fixtures_services.py); nothing needs
# to be running beforehand. Extra pytest arguments: make test PYTEST_ARGS='-k smoke -x'.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SERVE_ARGS ?=
# Debian packages the tests need: PostgreSQL server binaries, headless Chromium for UI tests,
# HAProxy for the cluster tests (tests/cluster: the deploy/ topology as processes).
SYSDEPS := postgresql chromium chromium-driver haproxy

# The models are built from configs in the tests; never reach for a model hub.
OFFLINE_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install venv sysdeps test serve lint bench cluster

install venv: $(STAMP)

# Re-install only when the dependency list changes. The stamp is written last, so an
# interrupted install is retried on the next run.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -U pip
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

# apt-get only when something is missing (so the common case costs nothing), and only as
# root: elsewhere we cannot install and the tests report what is missing themselves.
sysdeps:
	@if [ "$$(id -u)" -ne 0 ]; then exit 0; fi; \
	missing=""; \
	for pkg in $(SYSDEPS); do \
	  dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "sysdeps: missing$$missing and no apt-get; install them by hand" >&2; exit 0; fi; \
	echo "sysdeps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -q && apt-get install -y -q --no-install-recommends $$missing

test: $(STAMP) sysdeps
	$(OFFLINE_ENV) $(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/weightstore serve $(SERVE_ARGS)

# The production topology of deploy/compose.yaml as processes (tests/cluster/harness.py); prints the
# URL and the admin key once it is up.
cluster: $(STAMP) sysdeps
	$(OFFLINE_ENV) $(PY) -m tests.cluster.harness

# Fast checks first. mypy reads what to check (and how strictly) from [tool.mypy] in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile $(wildcard deploy/Dockerfile.*)
	$(PY) tools/module_map.py --check

# Each benchmark is its own module (run with -m from the repository root, so they can
# import shared helpers from the benchmarks package); stop at the first failure.
bench: $(STAMP) sysdeps
	@set -e; \
	shopt -s nullglob; \
	files=(benchmarks/bench_*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no benchmarks/bench_*.py found" >&2; exit 1; fi; \
	for f in "$${files[@]}"; do \
	  mod="benchmarks.$$(basename "$$f" .py)"; \
	  echo "== $$mod"; \
	  [ "$$mod" = benchmarks.collect ] || $(OFFLINE_ENV) $(PY) -m "$$mod"; \
	done; \
	$(PY) -m benchmarks.collect
