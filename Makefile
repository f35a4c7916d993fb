# latentforge — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when what it was built from changes (content hash, not mtimes: a fresh clone
# has new mtimes everywhere).
REQ_HASH := $(shell cat requirements.txt requirements.lock pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.stamp-$(REQ_HASH)
I2D_VENV := .venv-img2dataset
I2D_STAMP := $(I2D_VENV)/.stamp-$(shell sha256sum requirements-img2dataset.txt 2>/dev/null | cut -c1-16)

# pip warns once per package about this machine's local index folders; keep real errors visible.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

CONFIG ?= configs/demo.yaml
DEMO_CONFIG := configs/demo.yaml
NPROC ?= 1
DEMO_DIR ?= demo
# The commands the targets run; a test swaps them for an environment probe (tests/test_make_targets.py),
# and INSTALL= skips the venv check there.
INSTALL ?= install
LF ?= $(VENV)/bin/latentforge
TORCHRUN ?= $(VENV)/bin/torchrun
DEEPSPEED ?= $(VENV)/bin/deepspeed
LINT_IMPORTS ?= $(VENV)/bin/lint-imports
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false

# Offline and on the CPU: only what runs on the built-in tiny models (tests, the demo, benchmarks, soak).
# `make cache` and `make train` get the user's environment as it is: hub downloads unless the user set
# HF_HUB_OFFLINE, CUDA and NCCL wherever torch sees a GPU.
OFFLINE_TARGETS := test demo demo-assets bench soak
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE := 1
$(OFFLINE_TARGETS): export TRANSFORMERS_OFFLINE := 1
$(OFFLINE_TARGETS): export HF_DATASETS_OFFLINE := 1
$(OFFLINE_TARGETS): export DS_ACCELERATOR ?= cpu
$(OFFLINE_TARGETS): export CUDA_VISIBLE_DEVICES ?=

.PHONY: install test demo demo-assets cache train bench gpu-check lint clean dataset soak

install: $(STAMP) $(I2D_STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 2; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet "pip>=24" "setuptools>=77" wheel
	set -o pipefail; $(PY) -m pip install --quiet -r requirements.txt -c requirements.lock 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# img2dataset pins webdataset<0.3, so it lives beside the main venv, not in it.
$(I2D_STAMP):
	rm -rf $(I2D_VENV)
	$(PYTHON) -m venv $(I2D_VENV)
	set -o pipefail; $(I2D_VENV)/bin/python -m pip install --quiet -r requirements-img2dataset.txt 2>&1 | $(QUIET_PIP)
	touch $(I2D_STAMP)

# Long fault-injection runs (@pytest.mark.soak) run only under `make soak`; docs/reliability.md.
test: $(INSTALL)
	$(LINT_IMPORTS) --no-cache
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"

soak: $(INSTALL)
	$(PY) -m pytest -q -p no:cacheprovider -m soak

# Style (ruff) and the floors of the code (import-linter contracts in .importlinter).
lint: $(INSTALL)
	$(PY) -m ruff check app preprocess train shared devkit tests bench
	$(LINT_IMPORTS) --no-cache

demo: $(INSTALL)
	$(PY) -m latentforge.app.demo --dir $(DEMO_DIR)

# The demo config points at the demo's photos and tiny model; a fresh clone has neither until they are built.
demo-assets: $(INSTALL)
	$(LF) demo-data --out $(DEMO_DIR)/data
	$(LF) tiny-model --family sdxl --out $(DEMO_DIR)/tiny-sdxl

cache: $(INSTALL) $(if $(filter $(DEMO_CONFIG),$(CONFIG)),$(if $(wildcard $(DEMO_DIR)/tiny-sdxl/model_index.json),,demo-assets))
	@if [ "$(NPROC)" -gt 1 ]; then \
	  $(TORCHRUN) --standalone --nproc_per_node $(NPROC) -m latentforge.preprocess --config $(CONFIG) $(ARGS); \
	else $(LF) cache --config $(CONFIG) $(ARGS); fi

train: $(INSTALL)
	@if [ "$(NPROC)" -gt 1 ]; then \
	  $(DEEPSPEED) --num_gpus $(NPROC) --module latentforge.train --config $(CONFIG) $(ARGS); \
	else $(LF) train --config $(CONFIG) $(ARGS); fi

bench: $(INSTALL)
	$(PY) -m bench.run_all

# One H100/H200, at most 8 minutes: real-size SDXL (random weights) cache + train figures into
# bench/results/gpu.json (docs/benchmarks.md). Not offline-by-Make: the script sets what it needs and must see the GPU.
gpu-check: $(INSTALL)
	$(PY) -m bench.gpu_check $(ARGS)

# Download a url list (csv: url,caption[,more columns]) into img2dataset tar shards; see docs/data-sources.md.
dataset: install
	@test -n "$(URLS)" -a -n "$(OUT)" || { echo "usage: make dataset URLS=urls.csv OUT=data/my-crawl [ARGS='--processes 4 --threads 64']" >&2; exit 2; }
	$(PY) -m latentforge.preprocess.dataset_download --urls "$(URLS)" --out "$(OUT)" --img2dataset $(I2D_VENV)/bin/img2dataset $(ARGS)

clean:
	rm -rf $(DEMO_DIR) .cache bench/results/*.json
