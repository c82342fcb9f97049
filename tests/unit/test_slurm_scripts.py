"""The sbatch scripts without a cluster: syntax, shellcheck, --dry-run command lines, and
the one-line errors. The real cluster runs are in tests/slurm/."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["slurm/smoke.sh", "slurm/upcycle_l14.sh", "slurm/upcycle_b16.sh", "slurm/dmu_b16.sh"]


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(env)
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=60)


def test_syntax_and_shellcheck():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").glob("*.sh"))
    files += ["tests/slurm/cluster.sh"]
    for f in files:
        assert subprocess.run(["bash", "-n", f], cwd=ROOT).returncode == 0, f
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-packages.txt)")
    proc = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def dense(tmp_path) -> str:
    """A directory the config accepts as checkpoint.upcycle_from (it checks the manifest)."""
    (tmp_path / "manifest.json").write_text("{}")
    return str(tmp_path)


def test_dry_run_prints_the_srun_line(dense):
    out = run("slurm/upcycle_l14.sh", "--dry-run", f"checkpoint.upcycle_from={dense}",
              "data.train_urls=/data/{0..9}.tar", RUN_DIR="runs/x")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.splitlines()[-1]
    # the header's 16 nodes x 8 tasks, 12 CPUs each; overrides before the run directory's own
    assert cmd.startswith("srun --kill-on-bad-exit=1 --nodes=16 --ntasks=128 "
                          "--ntasks-per-node=8 --cpus-per-task=12 "), cmd
    assert (f"-m trainer.train --config configs/l14_upcycle.yaml checkpoint.upcycle_from={dense}"
            in cmd), cmd
    assert cmd.rstrip().endswith("run_dir=runs/x checkpoint.save_dir=runs/x/checkpoints"), cmd
    assert not Path(ROOT / "runs/x").exists()  # a dry run writes nothing


def test_dry_run_torchrun_and_mpi_knobs(dense):
    out = run("slurm/upcycle_b16.sh", "--dry-run", f"checkpoint.upcycle_from={dense}",
              "data.train_urls=d", LAUNCHER="torchrun", MASTER_ADDR="node7", MASTER_PORT="1234")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.splitlines()[-1]
    assert "--nodes=4 --ntasks=4 --ntasks-per-node=1 --cpus-per-task=96" in cmd, cmd
    assert "--nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node7:1234" in cmd
    # torchrun's own restarts are off unless asked for: it would restart exits 2, 3 and 4 too
    assert "--rdzv-id=0 --max-restarts=0 -m trainer.train" in cmd, cmd
    out = run("slurm/upcycle_b16.sh", "--dry-run", f"checkpoint.upcycle_from={dense}",
              "data.train_urls=d", LAUNCHER="torchrun", TORCHRUN_MAX_RESTARTS="2")
    assert "--max-restarts=2 -m trainer.train" in out.stdout.splitlines()[-1], out.stdout
    out = run("slurm/smoke.sh", "--dry-run", SRUN_MPI="pmix", SMOKE_DATA="/d")
    cmd = out.stdout.splitlines()[-1]
    assert "--cpus-per-task=1 --mpi=pmix " in cmd and "data.train_urls=/d/fmnist-train" in cmd


def test_dry_run_dmu_runs_the_dmu_driver(dense):
    out = run("slurm/dmu_b16.sh", "--dry-run", f"dmu.dense={dense}", "data.train_urls=d",
              RUN_DIR="runs/d")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.splitlines()[-1]
    assert cmd.startswith("srun --kill-on-bad-exit=1 --nodes=1 --ntasks=8 "), cmd
    assert f"-m trainer.dmu --config configs/dmu_b16.yaml dmu.dense={dense} " in cmd, cmd
    assert cmd.rstrip().endswith("run_dir=runs/d checkpoint.save_dir=runs/d/checkpoints"), cmd
    out = run("slurm/dmu_b16.sh", "--dry-run", "data.train_urls=d")
    assert out.returncode == 2 and "dmu.dense is empty" in out.stderr, out.stderr


@pytest.mark.parametrize("args,env,message", [
    (["--dry-run", "nonsense"], {}, "unknown argument 'nonsense'"),
    (["--dry-run", "train.nope=1"], {}, "unknown config key 'train.nope'"),
    (["--dry-run", "data.train_urls=x"], {}, "checkpoint.upcycle_from is empty"),
    (["--dry-run", "checkpoint.upcycle_from=c", "data.train_urls=x"], {},
     "checkpoint.upcycle_from='c': no checkpoint there"),
    (["--dry-run", "checkpoint.upcycle_from=DENSE", "data.train_urls=x"], {"LAUNCHER": "mpirun"},
     "LAUNCHER=mpirun (expected srun or torchrun)"),
    (["checkpoint.upcycle_from=DENSE", "data.train_urls=x"], {}, "not inside a SLURM allocation"),
])
def test_bad_input_is_one_clear_line(args, env, message, dense):
    out = run("slurm/upcycle_l14.sh", *[a.replace("DENSE", dense) for a in args], **env)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_help_lists_the_knobs():
    out = run("slurm/smoke.sh", "--help")
    assert out.returncode == 0 and "sbatch slurm/smoke.sh" in out.stdout and "LAUNCHER" in out.stdout


def test_label_regions_array_task_from_slurm_variables():
    """slurm/label_regions.sh: task index = array id - first id, count = array size; a
    non-contiguous array is refused in one line (exit 2)."""
    array = {"SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "5",
             "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}
    out = run("slurm/label_regions.sh", "--dry-run", "--shards", "d/{0..9}.tar", **array)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].endswith(
        "tools/label_regions.py --task-index 1 --task-count 4 --quiet --shards d/{0..9}.tar")
    out = run("slurm/label_regions.sh", "--dry-run", **dict(array, SLURM_ARRAY_TASK_MAX="9"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "--array must be one contiguous range (tasks 2..9 but 4 of them)" in out.stderr
