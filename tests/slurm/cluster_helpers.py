"""What the SLURM tests share: a running test cluster (cluster.sh) and `scontrol show job`."""
from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path
from typing import Iterator

from distributed.launcher import ROOT, clean_env

CLUSTER = str(ROOT / "tests/slurm/cluster.sh")


@contextlib.contextmanager
def running_cluster(directory: Path) -> Iterator[dict]:
    """Start a single-node cluster with its state in `directory`; yields an environment whose
    SLURM_CONF points at it (the repo importable, one thread per process); stops it after."""
    out = subprocess.run(["bash", CLUSTER, "start", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env = clean_env()
    env["SLURM_CONF"] = str(directory / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", CLUSTER, "stop", str(directory)], timeout=60)


def job_info(env: dict, job: str) -> dict:
    """`scontrol show job` as a dict (JobState, Reason, ExitCode, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))
