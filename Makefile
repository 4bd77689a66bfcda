# One-command set-up on a fresh machine: a venv, torch (pinned), the build tools, the extension.
#   make demo    the main job: K-FAC vs SGD vs Adam on the digits data, and K-FAC vs AdamW on a
#                character-level transformer (tables + plots)
#   make test    build + the test suite (CPU; CUDA tests too when a GPU is present)
#   make bench   quick benchmarks: ops and whole step, native vs pure-PyTorch reference; a
#                1-minute time-to-target smoke run against AdamW (the full one: bench/time_to_target.py)
# KFAC_EXT_WITH_CUDA=AUTO|ON|OFF picks the CUDA kernels (AUTO: iff torch is a CUDA build and
# nvcc is found; CI uses ON so every .cu file is compiled).
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
KFAC_EXT_WITH_CUDA ?= AUTO
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: all build test bench demo clean

all: test

$(VENV)/.deps-installed: requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) -r requirements-dev.txt
	touch $@

build: $(VENV)/.deps-installed
	KFAC_EXT_WITH_CUDA=$(KFAC_EXT_WITH_CUDA) $(PY) -m pip install --quiet --no-build-isolation --no-deps .

# Plain `pytest` (not `python -m pytest`) so tests import the installed package, not ./kfac_ext.
test: build
	$(VENV)/bin/pytest tests -q

bench: build
	$(PY) bench/bench_ops.py --quick
	$(PY) bench/bench_step.py --quick
	$(PY) bench/time_to_target.py --quick

demo: build
	$(PY) bench/demo.py
	$(PY) bench/demo_text.py

clean:
	rm -rf build $(VENV)
