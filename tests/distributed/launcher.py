"""Launching a check script (or the trainer) under torchrun from a test, on gloo/CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def start(cmd: list[str], log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, output to ``log`` (default: a temporary file that
    ``finish`` removes). A rank killed with SIGKILL can leave helper processes behind (data
    workers) that would hold a pipe open; ``finish`` kills the whole session. ``env``: added to
    clean_env()."""
    keep = log is not None
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"upclip-run-{time.time_ns()}.log"
    f = open(log, "w+")
    proc = subprocess.Popen(cmd, env={**clean_env(), **(env or {})}, cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log, proc.keep_log = f, keep
    return proc


def output(proc: subprocess.Popen) -> str:
    """Everything ``proc`` printed so far."""
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for ``proc``, kill what is left of its session; (exit code, output)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = output(proc)
    proc.log.close()
    if not proc.keep_log:
        os.unlink(proc.log.name)
    return proc.returncode, out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl; a step logged twice (before a crash and after
    the restart) keeps the later value."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
