# make demo / make test work from a fresh clone: both run `make setup`, which creates .venv and installs
# everything every preset needs to build here (Python packages, cross compilers, qemu, the emulated aarch64).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean system-deps arm64-env board-server

# Debian packages the presets and the tests use: the aarch64 cross compiler (TVM for arm64, rpi4, rpi5 and
# the Jetsons), the Cortex-M cross compiler, its C library and qemu-system-arm (the C backend's sizes and
# qemu check for cortex-m4/m7), real data that works offline (Fashion-MNIST for the INT8 accuracy test)
# and Chromium to render report.html.
SYSTEM_PACKAGES := dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu chromium gcc-arm-none-eabi libnewlib-arm-none-eabi \
  qemu-system-arm

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on local disk at this exact version; anything else pulls a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,test]'
	# Triton's server for `dlopt serve`: the nvidia-pytriton wheel ships tritonserver and its Python backend.
	# --no-deps: its Python layer (unused by dlopt) pins NumPy<2 and protobuf<7, which the rest of the stack outgrew.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps nvidia-pytriton==0.7.0
	touch $(STAMP)

# Installs the missing packages as root, or through sudo when it asks no password; otherwise it prints the
# exact line to run and fails.
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	[ -z "$$missing" ] && exit 0; missing=$$(echo $$missing); \
	command -v apt-get >/dev/null || { echo "system-deps: no apt-get here; install the equivalents of these Debian packages: $$missing"; exit 1; }; \
	sudo=""; if [ "$$(id -u)" != 0 ]; then \
	  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "system-deps: needs root; run: sudo apt-get install -y $$missing"; exit 1; fi; \
	fi; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	  || { echo "system-deps: apt-get failed; run: sudo apt-get install -y $$missing"; exit 1; }

# Everything every preset needs here.  Best effort past the Python packages: without the Debian packages
# the demo still runs (on this CPU), and `dlopt targets` names, per preset, what is missing and its install line.
setup: $(STAMP)
	@# dlopt's own modules byte-compiled once (pip compiles the packages, but not an editable install's
	@# sources, and with PYTHONDONTWRITEBYTECODE set nothing else writes them: each process compiled them anew)
	@$(BIN)/python -m compileall -q -j 0 optimizer passes targets calibration tests
	@$(MAKE) --no-print-directory system-deps || echo "make setup: carrying on without them; 'dlopt targets' says which presets lose what"
	@$(MAKE) --no-print-directory arm64-env || echo "make arm64-env failed: aarch64 TVM libraries are built but not run here"

demo: setup
	$(BIN)/dlopt demo

# Test files run in TEST_WORKERS processes (pytest-xdist; one file stays in one process, so its shared
# fixtures are built once): many tests wait on subprocesses, qemu and deadlines, so 3 on 2 cores is
# about twice as fast as one.  TEST_WORKERS=0 runs them in this process, one after another.  The heaviest
# file left goes first (tests/heavy_first.py; seconds per file in tests/file_seconds.json, refreshed as it says).
TEST_WORKERS ?= 3

# The tests need the Debian packages: a missing one fails here, before the suite.
test: setup
	@$(MAKE) --no-print-directory system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

# An emulated aarch64 for running the rpi5 TVM library here (dlopt.device.emulation): qemu-user, Debian's
# arm64 Python with the C libraries it and the wheels load (sysroot/), PyPI's aarch64 wheels (site/;
# TVM's runtime library only: its 240 MB compiler library is never loaded there).  apt works on a
# private arm64 package list, so the machine's dpkg architectures and package lists stay as they are.
# Built in a temporary folder, probed, then renamed into place; rebuilt only when the pins change.
ARM64 := $(VENV)/arm64
ARM64_DEBS := python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 \
  zlib1g libexpat1 libffi8
ARM64_WHEELS := apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml-dtypes==0.6.0 \
  typing-extensions==4.16.0 executorch==1.5.1
ARM64_PIP := --disable-pip-version-check -q --only-binary=:all: --platform manylinux_2_28_aarch64 \
  --python-version 3.11 --implementation cp
ARM64_SPEC := $(ARM64_DEBS) $(ARM64_WHEELS)

arm64-env: | $(STAMP)
	@if [ "$$(cat $(ARM64)/.built 2>/dev/null)" = "$(ARM64_SPEC)" ]; then echo "$(ARM64) is up to date"; exit 0; fi; \
	set -e; \
	if ! command -v qemu-aarch64 >/dev/null; then \
	  command -v apt-get >/dev/null || { echo "install qemu-user (for qemu-aarch64) by hand"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; \
	fi; \
	command -v apt-get >/dev/null || { echo "apt-get is needed to fetch Debian's arm64 Python"; exit 1; }; \
	started=$$(date +%s); \
	tmp=$$(mktemp -d $(abspath $(VENV))/.arm64-build.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p $$tmp/apt/lists/partial $$tmp/apt/cache/archives/partial $$tmp/debs; touch $$tmp/apt/status; \
	apt="-qq -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists=$$tmp/apt/lists \
	  -o Dir::Cache=$$tmp/apt/cache -o Dir::State::status=$$tmp/apt/status -o Debug::NoLocking=1 \
	  -o APT::Sandbox::User=root"; \
	apt-get $$apt update; \
	(cd $$tmp/debs && apt-get $$apt download $(ARM64_DEBS)); \
	for deb in $$tmp/debs/*.deb; do dpkg -x $$deb $$tmp/sysroot; done; \
	$(BIN)/pip download $(ARM64_PIP) --no-deps -d $$tmp/wheels $(ARM64_WHEELS); \
	$(BIN)/pip install $(ARM64_PIP) --no-deps --no-index --target $$tmp/site $$tmp/wheels/*.whl; \
	rm -rf $$tmp/apt $$tmp/debs $$tmp/wheels $$tmp/site/bin $$tmp/site/tvm/lib/libtvm_compiler.so \
	  $$(find $$tmp/site/executorch -mindepth 1 -maxdepth 1 ! -name lib ! -name include) \
	  $$tmp/site/executorch/lib/libexecutorch_backend_openvino.so $$tmp/site/executorch/lib/libexecutorch_etdump.so; \
	$(BIN)/python -m dlopt.device.emulation $$tmp; \
	echo "$(ARM64_SPEC)" > $$tmp/.built; \
	rm -rf $(ARM64).old; if [ -e $(ARM64) ]; then mv -T $(ARM64) $(ARM64).old; fi; \
	mv -T $$tmp $(ARM64); rm -rf $(ARM64).old; \
	echo "built $(ARM64) in $$(( $$(date +%s) - started )) s: $$(du -sh $(ARM64) | cut -f1)"

# An emulated aarch64 board for trying RPC here (docs/device-farm.md); a tracker must listen at TRACKER.
TRACKER ?= 127.0.0.1:9190
KEY ?= rpi5
board-server: arm64-env
	$(BIN)/python -m dlopt.device.emulation serve --tracker $(TRACKER) --key $(KEY) --cpu cortex-a76

bench: $(STAMP)
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
