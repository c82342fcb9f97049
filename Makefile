# UpCLIP: `make smoke` runs the tiny built-in job, `make test` runs the test suite.
# Both install everything they need on a fresh machine (apt packages, then .venv).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1

.PHONY: setup smoke test kernels clean

setup: $(VENV)/.installed

# apt packages first (Debian names, one per line in apt-packages.txt), then the venv.
$(VENV)/.installed: requirements.txt apt-packages.txt pyproject.toml
	@missing=$$(for p in $$(grep -v '^#' apt-packages.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: DeepSpeed's setup imports it. DS_BUILD_OPS=0: no op is compiled at install.
	DS_BUILD_OPS=0 $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	# CUTLASS C++ headers for kernels/ (headers only: no dependencies needed)
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	# clip_benchmark's metric modules (tests' reference); its other dependencies are not needed
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	# UpCLIP itself, editable: the upclip / upclip-train ... commands in .venv/bin
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Fashion-MNIST shards, a dense tiny CLIP, upcycled to MoE and trained on (tools/smoke.sh).
smoke: setup
	PY=$(PY) bash tools/smoke.sh

# The CUDA extension compiles on CPU machines too (torch CUDA build + nvcc), so a compile
# error fails CI; --reduced (bf16 instantiations) keeps it to ~3 min on 2 cores.
KERNELS_FLAGS ?= --reduced
kernels: setup
	CUDA_HOME=/usr/local/cuda MAX_JOBS=2 $(PY) -m kernels.build $(KERNELS_FLAGS)

test: setup kernels
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 tests/unit tests/distributed tests/slurm tests/gpu

clean:
	rm -rf runs
