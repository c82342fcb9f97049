"""Launching a check script (or the trainer) under torchrun from a test, on gloo/CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict:
    """This process's environment without any launcher's rank variables (pytest may itself
    run under one), with the repo importable and one thread per rank."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def run_check(script: str, nproc: int, workdir: Path, timeout: float = 900) -> None:
    """``torchrun --nproc_per_node=N tests/distributed/SCRIPT WORKDIR``; fails the test with
    the tail of its output when it does not exit 0."""
    proc = subprocess.run(torchrun_cmd(nproc, str(ROOT / "tests/distributed" / script),
                                       str(workdir)),
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
