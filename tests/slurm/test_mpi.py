"""The trainer under `mpirun` (Open MPI): ranks from OMPI_COMM_WORLD_*, and with no
MASTER_ADDR the rendezvous (rank 0's host name and a free port) broadcast over mpi4py.
`srun --mpi=pmix` is covered by tests/slurm/test_slurm.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from distributed.launcher import ROOT, clean_env


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="needs Open MPI's mpirun (openmpi-bin in apt-packages.txt)")
def test_trainer_under_mpirun(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE",
           sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml",
           "train.steps=3", "train.micro_batch_size=8", "data.train_urls=", "data.eval_urls=",
           "train.progress_bar=false", "train.tensorboard=false", f"run_dir={run_dir}",
           f"checkpoint.save_dir={run_dir}/ckpt"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # rank 0 found itself through MPI; the address is a host name, not the loopback default
    line = next(ln for ln in out.splitlines() if "mpi: rank 0/2" in ln)
    assert "master 127.0.0.1" not in line and "layout tp=1 pp=1 dp=2 ep=2" in line, line
    assert (run_dir / "ckpt/latest").read_text().strip() == "step_00000003"
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 0
