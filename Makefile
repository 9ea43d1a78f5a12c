# make demo / make test work from a fresh clone: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean system-deps

# Debian packages the tests use: real data that works offline (Fashion-MNIST for the INT8
# accuracy test), the aarch64 cross compiler for TVM's ARM builds, Chromium to render report.html.
SYSTEM_PACKAGES := dataset-fashion-mnist gcc-aarch64-linux-gnu chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on local disk at this exact version; anything else pulls a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,test]'
	touch $(STAMP)

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  command -v apt-get >/dev/null || { echo "install these Debian packages by hand: $$missing"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

demo: $(STAMP)
	$(BIN)/dlopt demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
