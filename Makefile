# The Makefile mirrors CI: `.ci/run` calls `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_CACHE ?= $(HOME)/.cache/e2ee-relay/pip
export PIP_CACHE_DIR := $(PIP_CACHE)
CODE := $(wildcard relay keyserver tests loadtest)

.PHONY: install proto run run-tls lint typecheck unit test helm-check container-check fuzz bench migrate services services-stop services-status clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.stamp-install  ## create .venv and install the package with dev tools

proto: install  ## regenerate relaypb/ from proto/
	rm -rf relaypb
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  $$(find proto -name '*.proto' | sort)
	find relaypb -type d -exec touch {}/__init__.py \;
	touch relaypb/py.typed

run: install  ## run the relay (127.0.0.1:50051) and key directory (127.0.0.1:50052) on the embedded default
	$(BIN)/relayd run --data-dir $${RELAY_DATA_DIR:-./data}

run-tls: install  ## `make run` over TLS with dev certificates (./data/certs); relayctl --tls-ca data/certs/ca.pem
	BIN=$(BIN) bash scripts/run-tls.sh

lint: install  ## ruff
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

typecheck: install  ## mypy strict on the packages
	$(BIN)/mypy
	$(BIN)/mypy loadtest

helm-check: install  ## helm lint + helm template (default, dev, production values), manifests validated offline
	@start=$$(date +%s); \
	$(BIN)/python scripts/tools/helm_check.py --helm "$$(bash scripts/tools/helm.sh)" --chart helm/e2ee-relay; \
	rc=$$?; echo "helm-check took $$(( $$(date +%s) - start )) s"; exit $$rc

container-check: install  ## hadolint the Dockerfile (no Docker engine needed)
	$(BIN)/hadolint --failure-threshold info Dockerfile
	@echo "container-check: Dockerfile is hadolint clean"

unit: install  ## only the tests that need no external services
	$(BIN)/pytest -q -m 'not services'

test: install lint typecheck helm-check container-check services  ## lint, typecheck, chart and container checks, start Redis + Cassandra, the whole suite
	RELAY_REQUIRE_SERVICES=1 $(BIN)/pytest -q

fuzz: install  ## hostile input on every RPC of both services: 10,000 generated requests each (FUZZ_EXAMPLES)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(BIN)/pytest -q -p no:randomly tests/fuzz

bench: install  ## the benchmark of docs/benchmarks.md: writes bench/results/latest.json (ARGS: e.g. --only store)
	$(BIN)/relay-loadtest bench $(ARGS)

migrate: install  ## apply Cassandra schema migrations (relayd migrate; --config via ARGS)
	$(BIN)/relayd migrate $(ARGS)

services:  ## install (cached) and start Redis and Cassandra on loopback
	bash scripts/services/services.sh start

services-stop:  ## stop the services started by `make services`
	bash scripts/services/services.sh stop

services-status:  ## show whether Redis and Cassandra are up
	bash scripts/services/services.sh status

clean:  ## remove caches (not the venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
