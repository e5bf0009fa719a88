# convserve: `make serve` and `make test` set up .venv/ themselves (once; a stamp file marks it).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CRDS := tests/crds/node_modules/.installed
# KServe's gRPC client, in a venv of its own: its dependencies clash with the project's pins
KSERVE := tests/kserve/.venv/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# the decode path's memory bound under fuzzing (tests/test_fuzz.py uses the same)
FUZZ_RSS_MB := 1024
# installs benchmarks.memory measures, by interpreter (add a CPU-torch venv's python to compare)
MEMORY_PYTHONS ?= $(BIN)/python

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Schemas for the Kubernetes custom resources (ServiceMonitor) the deploy tests validate.
$(CRDS): tests/crds/package-lock.json
	npm ci --prefix tests/crds --no-audit --no-fund --loglevel=error
	touch $(CRDS)

$(KSERVE): tests/kserve/requirements.txt
	test -x tests/kserve/.venv/bin/python || $(PYTHON) -m venv tests/kserve/.venv
	tests/kserve/.venv/bin/python -m pip install --quiet -r tests/kserve/requirements.txt
	touch $(KSERVE)

venv: $(STAMP) ## create .venv/ and install convserve with its dev tools

serve: $(STAMP) ## serve the bundled models on http://127.0.0.1:8000
	$(BIN)/convserve serve

test: $(STAMP) $(CRDS) $(KSERVE) lint typecheck ## lint, typecheck and run the whole test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy

fmt: $(STAMP) ## format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

fuzz: $(STAMP) ## fuzz the image decode path for ten minutes (atheris); fails on a crash, an input over 1 GB or 10 s
	mkdir -p artifacts/fuzz-corpus
	cp tests/data/corpus/*.bin artifacts/fuzz-corpus/
	$(BIN)/python tests/fuzz_decode.py artifacts/fuzz-corpus -max_total_time=600 \
		-rss_limit_mb=$(FUZZ_RSS_MB) -timeout=10 -artifact_prefix=artifacts/

bench: $(STAMP) ## benchmark against the in-process limit, a naive server, peers, convserve predict (about 60 min)
	command -v hey >/dev/null || (apt-get update -q && apt-get install -y -q hey)
	$(BIN)/python -m benchmarks.driver
	$(BIN)/python -m benchmarks.engines
	$(BIN)/python -m benchmarks.workers
	$(BIN)/python -m benchmarks.model_process
	$(BIN)/python -m benchmarks.first_request
	$(BIN)/python -m benchmarks.ready
	$(BIN)/python -m benchmarks.swap
	$(BIN)/python -m benchmarks.memory --python $(MEMORY_PYTHONS)
	$(BIN)/python -m benchmarks.cache
	$(BIN)/python -m benchmarks.offline

soak: $(STAMP) ## 20,000 mixed requests; fails if the server's memory grows past the bound
	$(BIN)/python -m benchmarks.soak
docker: ## build the image convserve:latest (TORCH_FLAVOUR=cuda for the CUDA build)
	docker build --build-arg TORCH_FLAVOUR=$(or $(TORCH_FLAVOUR),cpu) --tag convserve:latest .

docker-test: $(STAMP) ## build and run the image and compose stack on a private Docker engine (root)
	$(BIN)/python -m tests.docker_run

models: $(STAMP) ## retrain the bundled models (digits, lenet5) into new store versions
	$(BIN)/convserve train --arch small_cnn --name digits --epochs 12
	$(BIN)/convserve train --arch lenet5 --name lenet5 --epochs 12

grpc-code: $(STAMP) ## regenerate service/grpc_v2's protobuf and gRPC code from inference.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		service/grpc_v2/inference.proto

.PHONY: grpc-code help venv serve test lint typecheck fmt bench fuzz soak models docker docker-test
