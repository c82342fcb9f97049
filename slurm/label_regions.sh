#!/bin/bash
#SBATCH --job-name=upclip-label
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
# Region pseudo-labels for a shard set (tools/label_regions.py: caption noun phrases boxed by
# an OWLv2/OWL-ViT detector), as a SLURM array: task i of N labels the i-th contiguous block of
# the shard list. Tasks share nothing but OUT; each finished shard leaves OUT/_done/NAME.json,
# so a requeued, preempted or resubmitted task skips what is done and redoes only the shard it
# was in. The array must be one contiguous range (--array=0-N, a %throttle is fine): its size
# is the task count. To redo failed tasks, resubmit the same --array=0-N (finished shards are
# skipped in seconds), not the failed index alone (--array=5 would be task 0 of 1).
#   sbatch --array=0-31 --gpus-per-task=1 slurm/label_regions.sh \
#       --shards 'data/cc-{000000..000999}.tar' --detector models/owlv2 --out data/cc-regions
#   bash slurm/label_regions.sh --dry-run --shards ...    # print task 0 of 1's command
# Arguments are tools/label_regions.py's (see its --help). Knobs: PY=.venv/bin/python,
# UPCLIP_HOME=<checkout> (default: where sbatch ran).
set -euo pipefail
UPCLIP_HOME=$(cd "${UPCLIP_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}" && pwd)
cd "$UPCLIP_HOME"
dry_run=0
if [ "${1:-}" = --dry-run ]; then
  dry_run=1
  shift
fi
first=${SLURM_ARRAY_TASK_MIN:-0}
last=${SLURM_ARRAY_TASK_MAX:-0}
count=${SLURM_ARRAY_TASK_COUNT:-1}
index=$(( ${SLURM_ARRAY_TASK_ID:-0} - first ))
if [ $((last - first + 1)) -ne "$count" ]; then
  echo "label_regions.sh: error: --array must be one contiguous range (tasks $first..$last" \
       "but $count of them); use --array=0-$((count - 1))" >&2
  exit 2
fi
cmd=("${PY:-.venv/bin/python}" tools/label_regions.py --task-index "$index" --task-count "$count"
     --quiet "$@")
if [ "$dry_run" = 1 ]; then
  echo "${cmd[*]}"
  exit 0
fi
echo "label_regions.sh: task $index of $count, attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 ))" \
     "on $(hostname) (job ${SLURM_JOB_ID:-none}): ${cmd[*]}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
exec "${cmd[@]}"
