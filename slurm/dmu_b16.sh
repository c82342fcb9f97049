#!/bin/bash
#SBATCH --job-name=upclip-dmu-b16
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# DMU on a dense ViT-B/16 CLIP (configs/dmu_b16.yaml: 3 MCL stages, assembly into E=4 experts,
# router phase; 8 GPUs x 100 samples per step as the CLIP-MoE code). Each phase resumes from
# its own checkpoint and finished phases are skipped, so at each time limit (USR1 300 s
# before it: save, exit 3) the job requeues itself and carries on where it stopped.
#   sbatch slurm/dmu_b16.sh dmu.dense=ckpt/b16-dense data.train_urls='/data/cc3m/{0000..0575}.tar'
#   bash slurm/dmu_b16.sh --dry-run ...                              # print the srun line
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: the checkout is where sbatch ran.
UPCLIP_HOME=$(cd "${UPCLIP_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}" && pwd)
UPCLIP_SCRIPT=$0
: "${CONFIG:=configs/dmu_b16.yaml}"
UPCLIP_REQUIRE="data.train_urls dmu.dense"
UPCLIP_MODULE=trainer.dmu
export UPCLIP_HOME UPCLIP_SCRIPT CONFIG UPCLIP_REQUIRE UPCLIP_MODULE
# shellcheck source=slurm/launch.sh
source "$UPCLIP_HOME/slurm/launch.sh"
upclip_launch "$@"
