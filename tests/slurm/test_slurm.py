"""`sbatch slurm/smoke.sh` on a real single-node SLURM cluster (tests/slurm/cluster.sh).

One cluster for the module; the jobs run one after another (the node has this machine's CPUs
and each job takes 2). Shapes are the smoke config's at batch 32 for 12 steps, eval off.
  - a job runs to the end under `srun --mpi=pmix` and leaves its checkpoint and logs;
  - a job sent USR1 mid-run saves, exits 3, is requeued by the script, resumes and finishes:
    every step 1..12 logged exactly once, losses equal the uninterrupted job's (1e-6 abs);
  - the same with LAUNCHER=torchrun (one torchrun per node), where the requeue decision comes
    from run_dir/exit_status.json;
  - a task killed with SIGKILL mid-run (the OOM killer, a lost node): the script requeues the
    crashed job, which resumes from the last checkpoint to the same losses (1e-6 abs);
  - bad input found by the trainer (no shard of data.train_urls readable: exit 2) is not
    requeued; each attempt's outcome is in run_dir/launch/attempts.log.
SLURM holds a requeued job for ~2 minutes before it may start again (its BeginTime); the test
releases it at once with `scontrol update StartTime=now`, as an admin could.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed.launcher import ROOT, clean_env

STEPS = 12
TRAIN = [f"train.steps={STEPS}", "checkpoint.save_every=4", "train.log_every=1",
         "data.batch_size=32", "train.micro_batch_size=32", "data.eval_urls=",
         "train.progress_bar=false", "train.tensorboard=false"]

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("sbatch") is None or os.geteuid() != 0,
    reason="needs root and Debian's slurmctld/slurmd/slurm-client (apt-packages.txt)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running cluster, and a small sharded dataset for the jobs."""
    d = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "tests/slurm/cluster.sh")
    out = subprocess.run(["bash", script, "start", str(d / "cluster")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env = clean_env()
    env["SLURM_CONF"] = str(d / "cluster/slurm.conf")
    for name, split, count, regions in (("train", "train", 512, ["--regions", "box"]),
                                        ("eval", "test", 128, [])):
        subprocess.run([sys.executable, "tools/make_shards.py", "fashion-mnist", "--out",
                        str(d / f"data/fmnist-{name}"), "--split", split, "--count", str(count),
                        "--shard-size", "64", *regions], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
    env["SMOKE_DATA"] = str(d / "data")
    yield env, d
    subprocess.run(["bash", script, "stop", str(d / "cluster")], timeout=60)


def submit(env: dict, out: Path, *args: str, **extra_env: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", "slurm/smoke.sh", *args],
                          cwd=ROOT, env=dict(env, **extra_env), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait(env: dict, job: str, out: Path, timeout: float = 240, until=None) -> dict:
    """Poll until the job has ended (or ``until(info)`` holds); release requeue holds."""
    deadline, held_since = time.time() + timeout, None
    while time.time() < deadline:
        info = job_info(env, job)
        if until is not None and until(info):
            return info
        state = info.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            # Not at once: slurmd revokes the old run's credential with 1 s resolution, and a
            # restart within that second is killed ("Job credential revoked").
            held_since = held_since or time.time()
            if time.time() - held_since > 3:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                               check=True, timeout=30)
                held_since = None
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=30)
    pytest.fail(f"job {job} did not end in {timeout}s: {job_info(env, job)}\n"
                f"{out.read_text()[-4000:] if out.exists() else ''}")


def steps_logged(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def signal_after(env: dict, job: str, run_dir: Path, step: int, timeout: float = 180) -> None:
    """USR1 to the job's tasks once ``step`` is logged (what --signal=USR1@N does at the
    time limit)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s, _ in steps_logged(run_dir)):
            subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
            return
        if job_info(env, job).get("JobState") not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.5)
    pytest.fail(f"job {job} never logged step {step}: {job_info(env, job)}")


def assert_requeued_and_equal(info: dict, run_dir: Path, log: Path, reference: list, steps: int):
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1", info
    assert "requeueing job" in text and "attempt 2" in text, text[-4000:]
    logged = steps_logged(run_dir)
    # no lost and no repeated step: the stop came after a save, the resume starts right after it
    assert [s for s, _ in logged] == list(range(1, steps + 1)), logged
    # resume is exact (RNG, data position, optimizer moments): fp32 on the same machine, so
    # 1e-6 absolute as in tests/distributed/test_train_run.py (pytest.approx's rel=1e-5 let a
    # loss near 5 move by 5e-5)
    ref = dict(reference)
    for s, loss in logged:
        assert abs(loss - ref[s]) <= 1e-6, (s, loss, ref[s], loss - ref[s])
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{steps:08d}"


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    env, d = cluster
    run_dir, out = d / "run_a", d / "a.out"
    job = submit(env, out, *TRAIN, RUN_DIR=str(run_dir), SRUN_MPI="pmix")
    info = wait(env, job, out)
    return job, info, run_dir, out


def test_smoke_job_completes_and_leaves_a_checkpoint(uninterrupted):
    job, info, run_dir, out = uninterrupted
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "0"
    assert "slurm: rank 0/2" in text and "--mpi=pmix" in (run_dir / "launch/attempts.log").read_text()
    assert [s for s, _ in steps_logged(run_dir)] == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints/latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:08d}" and (ckpt / "manifest.json").is_file()
    assert json.loads((run_dir / "exit_status.json").read_text())["exit_code"] == 0
    assert (run_dir / "launch/config.yaml").read_text() == (ROOT / "configs/smoke.yaml").read_text()
    assert (run_dir / f"logs/job-{job}.log").read_text().count("step 12/12 loss") == 1


def test_usr1_checkpoints_requeues_and_resumes(cluster, uninterrupted):
    env, d = cluster
    run_dir, out = d / "run_b", d / "b.out"
    job = submit(env, out, *TRAIN, RUN_DIR=str(run_dir))
    signal_after(env, job, run_dir, 5)
    info = wait(env, job, out)
    assert "received SIGUSR1" in out.read_text()
    assert_requeued_and_equal(info, run_dir, out, steps_logged(uninterrupted[2]), STEPS)


def test_torchrun_launcher_requeues_and_resumes(cluster, uninterrupted):
    env, d = cluster
    run_dir, out = d / "run_c", d / "c.out"
    steps = 8  # warmup + constant LR: the first 8 steps are the 12-step run's first 8
    job = submit(env, out, *TRAIN, f"train.steps={steps}", RUN_DIR=str(run_dir),
                 LAUNCHER="torchrun")
    signal_after(env, job, run_dir, 3)
    info = wait(env, job, out)
    assert "torch.distributed.run" in (run_dir / "launch/attempts.log").read_text()
    assert "trainer status 3" in out.read_text()
    assert_requeued_and_equal(info, run_dir, out, steps_logged(uninterrupted[2]), steps)


def task_pid(job: str, rank: int) -> int:
    """The pid of the job's task of global rank ``rank`` (the node is this machine), not one
    of its data workers (forked: same command line and environment)."""
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank) \
                and "trainer.train" in " ".join(p.cmdline()) \
                and "trainer.train" not in " ".join(p.parent().cmdline()):  # not a data worker
            return p.pid
    raise LookupError(f"no task of rank {rank} in job {job}")


def test_sigkill_of_a_task_requeues_and_resumes(cluster, uninterrupted):
    env, d = cluster
    run_dir, out = d / "run_d", d / "d.out"
    job = submit(env, out, *TRAIN, RUN_DIR=str(run_dir))
    deadline = time.time() + 180
    while not any(s >= 6 for s, _ in steps_logged(run_dir)):  # after the step-4 save
        assert time.time() < deadline and job_info(env, job).get("JobState") in (
            "PENDING", "RUNNING"), (job_info(env, job), out.read_text()[-3000:])
        time.sleep(0.5)
    os.kill(task_pid(job, 1), 9)
    info = wait(env, job, out)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1", info
    attempts = (run_dir / "launch/attempts.log").read_text()
    assert "attempt 1 ended: crashed (srun exit" in attempts and ": requeued" in attempts, attempts
    assert "attempt 2 ended: done" in attempts, attempts
    assert "resumed from" in text, text[-4000:]
    # steps after the last save ran twice (before the kill and after the resume): the later
    # value counts, and it equals the uninterrupted job's
    logged = dict(steps_logged(run_dir))
    assert sorted(logged) == list(range(1, STEPS + 1)), logged
    ref = dict(steps_logged(uninterrupted[2]))
    for s, loss in logged.items():
        assert abs(loss - ref[s]) <= 1e-6, (s, loss, ref[s], loss - ref[s])


def test_bad_input_exit_2_is_not_requeued(cluster):
    env, d = cluster
    run_dir, out = d / "run_e", d / "e.out"
    job = submit(env, out, *TRAIN, "data.train_urls=pipe:cat /nonexistent/x-{0..3}.tar",
                 RUN_DIR=str(run_dir))
    info = wait(env, job, out)
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text[-4000:])
    assert info["Restarts"] == "0" and "requeueing" not in text, (info, text[-4000:])
    assert "no shard could be read" in text and "Traceback" not in text, text[-4000:]
    attempts = (run_dir / "launch/attempts.log").read_text()
    assert "attempt 1 ended: bad input (exit 2): not requeued" in attempts, attempts
