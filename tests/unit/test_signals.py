"""Stop signals under SLURM, which signals every process of a job step: a helper process
started while the trainer saves must survive SIGUSR1, and forked children must not act on it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.signals import StopSignals, stop_signals_blocked, write_exit_status

ROOT = Path(__file__).resolve().parents[2]

# A "rank" that starts megatron's own checkpoint-writer queue and ours, prints both Manager
# pids and waits to be killed.
_TWO_QUEUES = '''
import time
from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
from trainer import checkpoint
theirs = fsa._get_write_results_queue()
fsa._results_queue = None
checkpoint.own_writer_queue()
print(theirs._manager._process.pid, fsa._results_queue._manager._process.pid, flush=True)
time.sleep(600)
'''


def _manager_survives(blocked: bool) -> bool:
    ctx = mp.get_context("spawn")  # how megatron starts its checkpoint-writer queue
    if blocked:
        with stop_signals_blocked():
            m = ctx.Manager()
    else:
        m = ctx.Manager()
    try:
        os.kill(m._process.pid, signal.SIGUSR1)
        m._process.join(timeout=2)
        return m._process.is_alive()
    finally:
        m.shutdown()


def test_helper_started_while_blocked_survives_the_stop_signal():
    assert _manager_survives(blocked=True)
    assert not _manager_survives(blocked=False)  # what the block is for


def test_signal_during_block_is_not_lost():
    s = StopSignals()
    try:
        with stop_signals_blocked():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        # taken by another thread meanwhile, or pending until the block ends: seen either way
        assert s.received == "SIGUSR1"
    finally:
        s.restore()


def test_forked_child_ignores_the_signal():
    s = StopSignals()
    try:
        ctx = mp.get_context("fork")  # data workers
        p = ctx.Process(target=time.sleep, args=(60,))  # alive for the test however slow the host
        p.start()
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGUSR1)
        p.join(timeout=1)
        assert p.is_alive()  # inherited handler, but not the trainer: ignored
        p.terminate()
        p.join()
    finally:
        s.restore()


def test_exit_status_file(tmp_path):
    write_exit_status(str(tmp_path / "run"), 3, 17)
    data = json.loads((tmp_path / "run/exit_status.json").read_text())
    assert (data["exit_code"], data["step"]) == (3, 17)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_writer_queue_manager_dies_with_a_killed_rank():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rank = subprocess.Popen([sys.executable, "-c", _TWO_QUEUES], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    theirs = ours = None
    try:
        theirs, ours = (int(x) for x in rank.stdout.readline().split())
        assert _running(theirs) and _running(ours)
        os.kill(rank.pid, signal.SIGKILL)  # as the OOM killer does
        rank.wait()
        deadline = time.time() + 10
        while _running(ours) and time.time() < deadline:
            time.sleep(0.05)
        assert not _running(ours)
        time.sleep(0.5)
        assert _running(theirs)  # megatron's own is orphaned: what own_writer_queue is for
    finally:
        rank.kill()
        for pid in (theirs, ours):
            if pid and _running(pid):
                os.kill(pid, signal.SIGKILL)
