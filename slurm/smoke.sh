#!/bin/bash
#SBATCH --job-name=upclip-smoke
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The built-in tiny run (configs/smoke.yaml: MoE CLIP + CLOC, EP=2) on CPU, 2 tasks, 1 node.
# Fashion-MNIST shards are written to SMOKE_DATA (data/smoke) on the first run.
#   sbatch slurm/smoke.sh                          # from the checkout, after `make setup`
#   sbatch slurm/smoke.sh train.steps=50           # overrides: key=value
#   RUN_DIR=runs/s1 sbatch slurm/smoke.sh          # continue (or start) a run directory
#   bash slurm/smoke.sh --dry-run                  # print the srun command line only
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: the checkout is where sbatch ran.
UPCLIP_HOME=$(cd "${UPCLIP_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}" && pwd)
UPCLIP_SCRIPT=$0
: "${CONFIG:=configs/smoke.yaml}" "${SMOKE_DATA:=data/smoke}"
OVERRIDES="data.train_urls=$SMOKE_DATA/fmnist-train data.eval_urls=$SMOKE_DATA/fmnist-eval ${OVERRIDES:-}"

upclip_before_launch() {  # shards once, on the batch node, before the tasks start
  local py=${PY:-.venv/bin/python}
  if [ ! -f "$SMOKE_DATA/fmnist-train/dataset.json" ]; then
    rm -rf "$SMOKE_DATA/fmnist-train"
    "$py" tools/make_shards.py fashion-mnist --out "$SMOKE_DATA/fmnist-train" --split train \
      --count "${SMOKE_TRAIN_SAMPLES:-8000}" --shard-size 1000 --regions box
  fi
  if [ ! -f "$SMOKE_DATA/fmnist-eval/dataset.json" ]; then
    rm -rf "$SMOKE_DATA/fmnist-eval"
    "$py" tools/make_shards.py fashion-mnist --out "$SMOKE_DATA/fmnist-eval" --split test \
      --count "${SMOKE_EVAL_SAMPLES:-1000}" --shard-size 500
  fi
}

export UPCLIP_HOME UPCLIP_SCRIPT CONFIG OVERRIDES
# shellcheck source=slurm/launch.sh
source "$UPCLIP_HOME/slurm/launch.sh"
upclip_launch "$@"
