#!/usr/bin/env bash
# One command that verifies and measures UpCLIP's GPU path on one H100/H200 machine that has
# torch (and nvcc) but not our other dependencies. Budget: under 8 minutes.
#
# Here (the CPU machine):   bash ../shared/device/wheels.sh          # downloads .whl/
# On the device (one run):  carry [".whl"], command: bash bench/gpu_check.sh
#
# Steps (each logged to $OUT/gpu_check/<step>.log; a failing step is recorded, the rest run):
#   install   the wheels into /tmp/site (megatron-core, DeepSpeed, webdataset, open_clip...)
#   env       device, driver, versions, which grouped-mm entry point torch has
#   build     the full CUDA extension (bf16 + fp16, sm90a + sm80), not the CI's --reduced one
#   tests     tests/gpu (fail, not skip, when CUDA is present and the extension does not load)
#   gemm      bench/grouped_gemm.py --quick: extension vs torch grouped_mm vs a cuBLAS loop vs
#             one dense GEMM
#   step      bench/train_step.py --device cuda --preset vit-b-16: dense, MoE, open_clip
#   syncs     bench/host_syncs.py --device cuda: a 20-step bf16 MoE run under
#             torch.cuda.set_sync_debug_mode("warn"), host syncs per step
# Results: $OUT/gpu_check/*.json (OUT is the device tool's output folder; default
# bench/results), summarised in gpu_check-<device>.json. Commit them under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}/gpu_check"
mkdir -p "$out"
summary="$out/steps.jsonl"
: > "$summary"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY=${PY:-python3}

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name ($*)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - t0)) >> "$summary"
  tail -n 4 "$out/$name.log"
  return 0
}

step install 120 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
step env 60 $PY - <<'EOF'
import json, os, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "grouped_mm": {"F.grouped_mm": hasattr(torch.nn.functional, "grouped_mm"),
                       "torch._grouped_mm": hasattr(torch, "_grouped_mm")}}
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True,
                                    text=True).stdout.strip()
except OSError as e:
    info["driver"] = str(e)
from importlib.metadata import version, PackageNotFoundError
for p in ("megatron-core", "deepspeed", "open-clip-torch", "webdataset", "transformers"):
    try:
        info[p] = version(p)
    except PackageNotFoundError:
        info[p] = None
out = os.path.join(os.environ.get("OUT", "bench/results"), "gpu_check", "env.json")
open(out, "w").write(json.dumps(info, indent=1) + "\n")
print(json.dumps(info))
EOF
step build 200 env MAX_JOBS=16 $PY -m kernels.build
step tests 90 $PY -m pytest -q -p no:cacheprovider tests/gpu --junitxml="$out/tests_gpu.xml"
step gemm 90 $PY bench/grouped_gemm.py --quick --out "$out/grouped_gemm.json"
step step 120 $PY bench/train_step.py --device cuda --preset vit-b-16 --batch 64 --steps 5 \
  --warmup 2 --out "$out/train_step.json"
step syncs 60 $PY bench/host_syncs.py --device cuda --preset vit-b-16 --batch 32 --steps 20 \
  --out "$out/host_syncs.json"

$PY - "$out" <<'EOF'
import json, os, sys
d = sys.argv[1]
summary = {"benchmark": "gpu_check", "steps": [json.loads(x) for x in open(f"{d}/steps.jsonl")]}
for name in ("env", "grouped_gemm", "train_step", "host_syncs"):
    p = f"{d}/{name}.json"
    summary[name] = json.load(open(p)) if os.path.exists(p) else None
dev = (summary["env"] or {}).get("device", "unknown").replace(" ", "_")
path = f"{d}/gpu_check-{dev}.json"
open(path, "w").write(json.dumps(summary, indent=1) + "\n")
print("wrote", path, [(s["step"], s["rc"]) for s in summary["steps"]])
EOF
