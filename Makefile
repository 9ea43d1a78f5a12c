# make demo / make test work from a fresh clone: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on local disk at this exact version; anything else pulls a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dlopt demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
