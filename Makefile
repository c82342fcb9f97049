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

# One line per stage; apt's and pip's own output goes to $(SETUP_LOG) (its tail is printed
# when a stage fails). apt packages first (Debian names, one per line in apt-packages.txt),
# then the venv: torch first (DeepSpeed's setup imports it), DS_BUILD_OPS=0 (no op compiled
# at install), then requirements.txt and the CUTLASS C++ headers for kernels/ (headers only).
SETUP_LOG := $(VENV)/setup.log
STAGE = stage() { echo "setup: $$1"; shift; "$$@" >>$(SETUP_LOG) 2>&1 || { \
	  echo "setup: FAILED ($$*); the last 30 lines of $(SETUP_LOG):"; \
	  tail -n 30 $(SETUP_LOG); exit 1; }; }
PIP   = $(PY) -m pip install --progress-bar off
$(VENV)/.installed: requirements.txt apt-packages.txt pyproject.toml
	@mkdir -p $(VENV) && : > $(SETUP_LOG) && $(STAGE) && \
	echo "setup: into $(VENV); apt and pip output: $(SETUP_LOG)" && \
	missing=$$(for p in $$(grep -v '^#' apt-packages.txt); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then stage "apt-get install $$(echo $$missing)" $(SHELL) -c "apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y $$(echo $$missing)"; fi && \
	{ test -x $(PY) || stage "python3 -m venv $(VENV)" python3 -m venv $(VENV); } && \
	stage "pip: pip" $(PIP) --upgrade pip && \
	stage "pip: torch, torchvision (CUDA build, about 5 GB)" \
	  env DS_BUILD_OPS=0 $(PIP) torch==2.14.1 torchvision==0.29.1 && \
	stage "pip: requirements.txt" env DS_BUILD_OPS=0 $(PIP) -r requirements.txt && \
	stage "pip: CUTLASS headers (kernels/)" $(PIP) --no-deps nvidia-cutlass==4.2.0.0 && \
	stage "pip: clip-benchmark metrics (tests' reference; its other deps not needed)" \
	  $(PIP) --no-deps clip-benchmark==1.6.2 && \
	stage "pip: upclip (editable: the upclip / upclip-* commands)" $(PIP) --no-deps -e . && \
	touch $@ && echo "setup: done"

# Fashion-MNIST shards, a dense tiny CLIP, upcycled to MoE and trained on (tools/smoke.sh).
smoke: setup
	@PY=$(PY) bash tools/smoke.sh

# The CUDA extension compiles on CPU machines too (torch CUDA build + nvcc), so a compile
# error fails CI; --reduced (bf16 instantiations) keeps it to ~3 min on 2 cores.
KERNELS_FLAGS ?= --reduced
kernels: setup
	CUDA_HOME=/usr/local/cuda MAX_JOBS=2 $(PY) -m kernels.build $(KERNELS_FLAGS)

test: setup kernels
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 tests/unit tests/distributed tests/slurm tests/gpu

clean:
	rm -rf runs
