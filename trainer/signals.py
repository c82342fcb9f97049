"""Stop cleanly on SIGUSR1 / SIGTERM: finish the step, save, exit with ``EXIT_REQUEUE``.

SLURM sends the signal before the time limit (``sbatch --signal=USR1@120``) or on preemption
(SIGTERM); the launch scripts requeue the job when the trainer exits with ``EXIT_REQUEUE``,
and the requeued job resumes from ``checkpoint.save_dir/latest``. The signal may reach only
some ranks, so every step all ranks agree before anyone stops, in the same all-reduce that
agrees on whether the step's loss and gradient norm were finite.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.io import write_atomic

log = logging.getLogger("upclip")

# How a trainer process ends. No torch import at module level: ``python -m trainer.train``
# installs the stop handlers before it checks the config, and a bad config must fail fast.
EXIT_DONE = 0
EXIT_BAD_INPUT = 2    # bad config, layout, launch environment or missing shards (one line)
EXIT_REQUEUE = 3      # saved after a stop signal: requeue me
EXIT_NONFINITE = 4    # too many non-finite steps in a row: a human must look
EXIT_CODES = {
    EXIT_DONE: "done (train.steps reached)",
    1: "crashed (a Python traceback on stderr)",
    EXIT_BAD_INPUT: "bad input: config, layout, launch environment, data paths (one "
                    "'error: ...' line)",
    EXIT_REQUEUE: "stopped by SIGUSR1/SIGTERM after saving a checkpoint: requeue to resume",
    EXIT_NONFINITE: "too many non-finite steps in a row (train.max_nonfinite_steps)",
}
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextmanager
def stop_signals_blocked():
    """Run a block with the stop signals blocked in this thread. A signal meanwhile is not
    lost: another thread takes it, or it stays pending until the block ends.

    SLURM signals every process of a job step, not just the ranks, and a helper process
    started inside this block inherits the mask. That keeps megatron's checkpoint-writer
    queue (a ``spawn`` Manager, started by the first save) alive through the signal; without
    it the manager dies of SIGUSR1 and the save it is needed for fails with a broken pipe."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def die_with_parent(parent_pid: int) -> None:
    """Run in a helper process as it starts: Linux SIGKILLs it when the thread that started it
    exits (prctl PR_SET_PDEATHSIG), and it exits at once if that parent is already gone.

    A helper that outlives a rank killed with SIGKILL (the OOM killer, torchrun tearing down
    the other ranks of a failed attempt) otherwise runs until the node reboots: SLURM's cgroup
    cleans up after a job, a bare torchrun node does not."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(0)


class StopSignals:
    def __init__(self, signals=STOP_SIGNALS):
        self.received: str | None = None
        self._pid = os.getpid()
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (data worker): the trainer decides
            return
        if self.received is None:
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.received = signal.Signals(signum).name

    def agree(self, step_ok: bool) -> tuple[bool, bool]:
        """Collective, once per step: (every rank's step was finite, some rank got a signal),
        the same on every rank, in one all-reduce."""
        import torch
        import torch.distributed as dist

        device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL wants device tensors
        flags = torch.tensor([0.0 if step_ok else 1.0, 1.0 if self.received else 0.0],
                             device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop = flags.tolist()
        return not bad, bool(stop)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


EXIT_STATUS_FILE = "exit_status.json"


def write_exit_status(run_dir: str, exit_code: int, step: int) -> None:
    """``run_dir/exit_status.json``: how the trainer ended, for launchers that cannot see its
    exit code (torchrun turns every worker failure into 1). Written atomically by rank 0 (and
    by any rank that ends on bad input: each through its own temporary file)."""
    path = Path(run_dir) / EXIT_STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"exit_code": exit_code, "step": step, "time": time.time()})
                 + "\n", concurrent=True)
