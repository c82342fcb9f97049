# shellcheck shell=bash
# Shared launcher for the sbatch scripts in slurm/ (sourced, not run). One call:
#
#   upclip_launch "$@"      # args: key=value overrides, --dry-run, --help
#
# What it does, in order:
#  1. finds the checkout (UPCLIP_HOME, else the directory sbatch was run from) and its Python;
#  2. RUN_DIR (default runs/<job name>-<job id>): logs/, checkpoints/ and launch/ go there. The
#     first attempt snapshots CONFIG into RUN_DIR/launch/config.yaml; every later attempt (a
#     requeue, or a new job given the same RUN_DIR) trains from that snapshot, so editing
#     configs/ never changes a running experiment. Overrides given to the job always apply;
#     each attempt's command line is appended to RUN_DIR/launch/attempts.log;
#  3. rendezvous from the allocation: MASTER_ADDR = first node, MASTER_PORT = 20000 + job id
#     mod 20000 (set either variable to override);
#  4. starts one task per GPU with srun (LAUNCHER=srun, default; SRUN_MPI=pmix adds
#     --mpi=pmix) or one torchrun per node (LAUNCHER=torchrun);
#  5. the trainer resumes from RUN_DIR/checkpoints by itself (latest, or the newest checkpoint
#     that verifies). What this script does when it ends (the trainer's exit code, read from
#     RUN_DIR/exit_status.json when there is one, else srun's):
#       0  done;
#       2  bad input (config, data, no usable checkpoint) and 4 (non-finite loss): the job
#          fails, keeping the last checkpoint: a rerun would fail the same way;
#       3  stopped by the stop signal (#SBATCH --signal=USR1@<s>, or SIGTERM on preemption)
#          after saving: requeued (`scontrol requeue`);
#       anything else: a crash (a task killed, an NCCL timeout, a lost node, a segfault):
#          requeued, to resume from the last checkpoint;
#     at most MAX_RESTARTS requeues in all; each attempt's outcome and reason go to
#     RUN_DIR/launch/attempts.log. torchrun's own restarts (--max-restarts=TORCHRUN_MAX_RESTARTS,
#     default 0) are off by default: torchrun restarts every failing worker, the deliberate
#     exits 2, 3 and 4 included (a stop signal's exit 3 would train on in an allocation about
#     to end); crashes under torchrun are requeued like srun's.
#
# Environment knobs (all optional):
#   CONFIG=configs/...yaml   RUN_DIR=runs/...   PY=.venv/bin/python   UPCLIP_HOME=<checkout>
#   LAUNCHER=srun|torchrun   SRUN_MPI=pmix|...  SRUN_ARGS="extra srun flags"
#   NPROC_PER_NODE=<torchrun workers per node; default: tasks per node of the allocation>
#   MAX_RESTARTS=100         OVERRIDES="k=v k=v" (in addition to the script's arguments)
#   TORCHRUN_MAX_RESTARTS=0  (LAUNCHER=torchrun: torchrun's --max-restarts; see 5.)
#   DRY_RUN=1                (same as --dry-run: print the srun command line, run nothing)
#   UPCLIP_MODULE=trainer.train  (the entry point; slurm/dmu_b16.sh sets trainer.dmu)
#
# NCCL / OpenMP settings (exported only when unset, so a site profile wins):
#   OMP_NUM_THREADS=1                    one thread per rank; data loading uses worker processes
#   CUDA_DEVICE_MAX_CONNECTIONS=1        megatron-core's TP/SP comm overlap needs in-order streams
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1    a failed or timed-out collective kills the rank, so the
#                                        job fails fast instead of hanging to its time limit
#   NCCL_DEBUG=WARN                      INFO prints the topology and transports chosen
#   Site-specific, not set here: NCCL_SOCKET_IFNAME (the inter-node interface, e.g. ib0 or
#   ^lo,docker), NCCL_IB_HCA (which HCAs to use), NCCL_IB_GID_INDEX (RoCE), NCCL_NET_GDR_LEVEL.

upclip_die() { echo "upclip: error: $*" >&2; exit 2; }

upclip_usage() {
  sed -n 's/^# //p' "$1"
  echo "usage: sbatch $1 [key=value ...]   |   bash $1 --dry-run [key=value ...]"
  echo "knobs: CONFIG RUN_DIR PY LAUNCHER SRUN_MPI SRUN_ARGS NPROC_PER_NODE MAX_RESTARTS"
  echo "       TORCHRUN_MAX_RESTARTS OVERRIDES DRY_RUN UPCLIP_HOME UPCLIP_MODULE (see slurm/launch.sh)"
}

# The value of `#SBATCH --<key>=<value>` in a job script (for dry runs outside an allocation).
upclip_sbatch_header() {
  sed -n "s/^#SBATCH --$2=\([^ ]*\).*/\1/p" "$1" | head -n 1
}

upclip_exit_status() {  # exit_code from RUN_DIR/exit_status.json, empty if absent (a crash)
  # never a failing status: the caller runs under `set -e`
  if [ -f "$1" ]; then sed -n 's/.*"exit_code": *\([0-9]*\).*/\1/p' "$1"; fi
}

upclip_launch() {
  local script=${UPCLIP_SCRIPT:?} dry_run=${DRY_RUN:-0} a
  local -a overrides=()
  for a in "$@"; do
    case $a in
      --dry-run) dry_run=1 ;;
      -h|--help) upclip_usage "$script"; return 0 ;;
      *=*) overrides+=("$a") ;;
      *) upclip_die "unknown argument '$a' (expected key=value overrides or --dry-run)" ;;
    esac
  done
  # shellcheck disable=SC2206  # OVERRIDES is a space-separated list of key=value words
  [ -n "${OVERRIDES:-}" ] && overrides=(${OVERRIDES} "${overrides[@]}")

  cd "$UPCLIP_HOME" || upclip_die "cannot cd to UPCLIP_HOME=$UPCLIP_HOME"
  [ -f trainer/train.py ] || upclip_die "UPCLIP_HOME=$UPCLIP_HOME is not an UpCLIP checkout (submit from the checkout or set UPCLIP_HOME)"
  local py=${PY:-$UPCLIP_HOME/.venv/bin/python}
  [ "$dry_run" = 1 ] || [ -x "$py" ] || upclip_die "PY=$py is not executable (run 'make setup' in $UPCLIP_HOME or set PY)"

  local job_id=${SLURM_JOB_ID:-} restart=${SLURM_RESTART_COUNT:-0}
  if [ -z "$job_id" ] && [ "$dry_run" != 1 ]; then
    upclip_die "not inside a SLURM allocation: submit with 'sbatch $script', or add --dry-run"
  fi
  local nodes=${SLURM_JOB_NUM_NODES:-$(upclip_sbatch_header "$script" nodes)}
  local tasks_per_node=${SLURM_NTASKS_PER_NODE:-$(upclip_sbatch_header "$script" ntasks-per-node)}
  local cpus_per_task=${SLURM_CPUS_PER_TASK:-$(upclip_sbatch_header "$script" cpus-per-task)}
  nodes=${nodes:-1} tasks_per_node=${tasks_per_node:-1} cpus_per_task=${cpus_per_task:-1}
  local job_name=${SLURM_JOB_NAME:-$(upclip_sbatch_header "$script" job-name)}

  local run_dir=${RUN_DIR:-runs/${job_name:-upclip}-${job_id:-dryrun}}
  local config=${CONFIG:?CONFIG is not set}
  local snapshot=$run_dir/launch/config.yaml
  if [ "$dry_run" != 1 ]; then
    mkdir -p "$run_dir/logs" "$run_dir/launch" "$run_dir/checkpoints"
    if [ -f "$snapshot" ]; then
      cmp -s "$config" "$snapshot" || echo "upclip: $run_dir continues with its snapshot $snapshot ($config differs; delete the snapshot to take the new one)"
    else
      [ -f "$config" ] || upclip_die "CONFIG=$config: no such file"
      cp "$config" "$snapshot.tmp" && mv "$snapshot.tmp" "$snapshot"
    fi
    config=$snapshot
    # Everything this script and the trainer print, also in the run directory.
    exec > >(tee -a "$run_dir/logs/job-$job_id.log") 2>&1
  fi

  : "${OMP_NUM_THREADS:=1}" "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
  : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}" "${NCCL_DEBUG:=WARN}"
  export OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG
  export PYTHONPATH="$UPCLIP_HOME${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export TOKENIZERS_PARALLELISM=false
  local master_addr=${MASTER_ADDR:-}
  if [ -z "$master_addr" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
      master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
      master_addr="<first node>"
    fi
  fi
  local master_port=${MASTER_PORT:-$((20000 + ${job_id:-0} % 20000))}
  export MASTER_ADDR=$master_addr MASTER_PORT=$master_port

  local -a train=(-m "${UPCLIP_MODULE:-trainer.train}" --config "$config" "${overrides[@]}"
                  "run_dir=$run_dir" "checkpoint.save_dir=$run_dir/checkpoints")
  if [ -x "$py" ]; then
    # Resolve the config once here: a bad override fails in one line, not once per rank, and
    # UPCLIP_REQUIRE names fields that must not be empty (no real job trains on synthetic data).
    "$py" - "$config" "${UPCLIP_REQUIRE:-}" "${overrides[@]}" <<'PY' || exit 2
import sys
from trainer.config import ConfigError, load_config
path, required, overrides = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
try:
    cfg = load_config(path, overrides)
except ConfigError as e:
    sys.exit(f"upclip: error: {e}")
for key in required:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if not value:
        sys.exit(f"upclip: error: {key} is empty: pass {key}=... to the job (or set it in {path})")
PY
  fi
  local -a cmd
  # shellcheck disable=SC2206  # SRUN_ARGS is a space-separated list of srun flags
  local -a extra=(${SRUN_ARGS:-})
  case ${LAUNCHER:-srun} in
    srun)
      cmd=(srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks=$((nodes * tasks_per_node))
           --ntasks-per-node="$tasks_per_node"
           --cpus-per-task="$cpus_per_task" ${SRUN_MPI:+--mpi="$SRUN_MPI"} "${extra[@]}"
           "$py" "${train[@]}") ;;
    torchrun)
      local nproc=${NPROC_PER_NODE:-$tasks_per_node}
      # torchrun would die of SIGUSR1 (and turn the workers' exit 3 into 1): its agent ignores
      # the signal, the workers (which install their own handler) save, and the requeue
      # decision reads RUN_DIR/exit_status.json.
      cmd=(srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
           --cpus-per-task=$((cpus_per_task * tasks_per_node)) "${extra[@]}"
           # shellcheck disable=SC2016  # "$@" is expanded by that inner bash
           bash -c 'trap "" USR1; exec "$@"' torchrun
           "$py" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$nproc"
           --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port"
           --rdzv-id="${job_id:-0}" --max-restarts="${TORCHRUN_MAX_RESTARTS:-0}"
           "${train[@]}") ;;
    *) upclip_die "LAUNCHER=${LAUNCHER} (expected srun or torchrun)" ;;
  esac

  if [ "$dry_run" = 1 ]; then
    echo "# run dir $run_dir, config $config, master $master_addr:$master_port"
    printf '%q ' "${cmd[@]}"
    echo
    return 0
  fi

  if declare -F upclip_before_launch >/dev/null; then upclip_before_launch; fi
  echo "upclip: job $job_id attempt $((restart + 1)) on $nodes node(s) x $tasks_per_node task(s), run dir $run_dir"
  { date -u +%FT%TZ; printf '%q ' "${cmd[@]}"; echo; } >>"$run_dir/launch/attempts.log"
  rm -f "$run_dir/exit_status.json"
  local rc=0
  "${cmd[@]}" || rc=$?
  local status
  status=$(upclip_exit_status "$run_dir/exit_status.json")
  echo "upclip: srun exited $rc, trainer status ${status:-none}"
  local code=${status:-$rc} reason requeue=0
  case $code in
    0) if [ "$rc" = 0 ]; then reason="done"; else reason="trainer finished but srun exited $rc"; code=$rc; fi ;;
    2) reason="bad input (exit 2): not requeued, fix the input and resubmit" ;;
    4) reason="non-finite loss (exit 4): not requeued, a human must look" ;;
    3) reason="stopped by a signal after saving (exit 3)"; requeue=1 ;;
    *) reason="crashed (srun exit $rc, trainer status ${status:-none})"; requeue=1 ;;
  esac
  if [ "$requeue" = 1 ] && [ "$restart" -ge "${MAX_RESTARTS:-100}" ]; then
    reason="$reason; already restarted $restart times (MAX_RESTARTS=${MAX_RESTARTS:-100}): not requeued"
    requeue=0
  elif [ "$requeue" = 1 ]; then
    reason="$reason: requeued"
  fi
  echo "$(date -u +%FT%TZ) attempt $((restart + 1)) ended: $reason" >>"$run_dir/launch/attempts.log"
  if [ "$requeue" = 1 ]; then
    echo "upclip: $reason: requeueing job $job_id"
    scontrol requeue "$job_id"
    exit 0
  fi
  if [ "$code" = 0 ]; then
    exit 0
  fi
  echo "upclip: $reason" >&2
  exit "$code"
}
