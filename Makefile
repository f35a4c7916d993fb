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
NPROC ?= 1
DEMO_DIR ?= demo
# Everything the tests and the demo run is offline: tiny models are built locally, data ships in packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo cache train bench lint clean dataset soak

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
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"

soak: install
	$(PY) -m pytest -q -p no:cacheprovider -m soak

# Style (ruff) and the floors of the code (import-linter contracts in .importlinter).
lint: install
	$(PY) -m ruff check app preprocess train shared devkit tests bench
	$(VENV)/bin/lint-imports --no-cache

demo: install
	$(PY) -m latentforge.app.demo --dir $(DEMO_DIR)

cache: install
	@if [ "$(NPROC)" -gt 1 ]; then \
	  $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m latentforge.preprocess --config $(CONFIG) $(ARGS); \
	else $(VENV)/bin/latentforge cache --config $(CONFIG) $(ARGS); fi

train: install
	@if [ "$(NPROC)" -gt 1 ]; then \
	  $(VENV)/bin/deepspeed --num_gpus $(NPROC) --module latentforge.train --config $(CONFIG) $(ARGS); \
	else $(VENV)/bin/latentforge train --config $(CONFIG) $(ARGS); fi

bench: install
	$(PY) -m bench.run_all

# Download a url list (csv: url,caption[,more columns]) into img2dataset tar shards; see docs/data-sources.md.
dataset: install
	@test -n "$(URLS)" -a -n "$(OUT)" || { echo "usage: make dataset URLS=urls.csv OUT=data/my-crawl [ARGS='--processes 4 --threads 64']" >&2; exit 2; }
	$(PY) -m latentforge.preprocess.dataset_download --urls "$(URLS)" --out "$(OUT)" --img2dataset $(I2D_VENV)/bin/img2dataset $(ARGS)

clean:
	rm -rf $(DEMO_DIR) .cache bench/results/*.json
