# make demo / make test work from a fresh clone: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean datasets

# Real data that works offline: Debian's Fashion-MNIST (the INT8 accuracy tests use it).
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on local disk at this exact version; anything else pulls a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,test]'
	touch $(STAMP)

$(FASHION):
	@command -v apt-get >/dev/null || { echo "apt-get not found: install Debian's dataset-fashion-mnist by hand"; exit 1; }
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

datasets: $(FASHION)

demo: $(STAMP)
	$(BIN)/dlopt demo

test: $(STAMP) datasets
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
