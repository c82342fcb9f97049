#!/bin/bash
#SBATCH --job-name=upclip-l14
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Upcycle a dense ViT-L/14 CLIP to MoE (configs/l14_upcycle.yaml: E=8, top-2, every other
# block, EP=8 over the GPUs of a node) and train on: 16 nodes x 8 GPUs, one task per GPU.
# The job requeues itself at each time limit (USR1 600 s before it: save, exit 3, requeue)
# and resumes from RUN_DIR/checkpoints/latest until train.steps are done.
#   sbatch slurm/upcycle_l14.sh checkpoint.upcycle_from=ckpt/l14-dense \
#       data.train_urls='/data/laion/{000000..099999}.tar'
#   RUN_DIR=runs/l14-a sbatch --nodes=32 slurm/upcycle_l14.sh ...   # more nodes: more DP
#   LAUNCHER=torchrun sbatch slurm/upcycle_l14.sh ...                # one torchrun per node
#   bash slurm/upcycle_l14.sh --dry-run ...                          # print the srun line
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: the checkout is where sbatch ran.
UPCLIP_HOME=$(cd "${UPCLIP_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}" && pwd)
UPCLIP_SCRIPT=$0
: "${CONFIG:=configs/l14_upcycle.yaml}"
UPCLIP_REQUIRE="data.train_urls checkpoint.upcycle_from"
export UPCLIP_HOME UPCLIP_SCRIPT CONFIG UPCLIP_REQUIRE
# shellcheck source=slurm/launch.sh
source "$UPCLIP_HOME/slurm/launch.sh"
upclip_launch "$@"
