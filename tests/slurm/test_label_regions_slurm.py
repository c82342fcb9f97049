"""`sbatch --array=0-1 slurm/label_regions.sh` on a real single-node SLURM cluster
(tests/slurm/cluster.sh), with a tiny randomly initialised OWLv2 (tests/tiny_detectors.py).

Four input shards (one corrupt image, one caption without a noun phrase), two array tasks of two
shards each. Task 1's second shard is a `pipe:` URL that stalls on the task's first attempt, so
the test requeues task 1 (`scontrol requeue`, what preemption does) at a known point: after its
first shard is done, inside its second. Then:
  - both tasks complete, task 1 after one restart;
  - every shard was labelled exactly once: task 1's second attempt skips its finished shard
    (the done marker still carries the first attempt's pid) and labels only the stalled one;
  - the totals count the corrupt image and the phrase-less caption, every sample is kept;
  - the output shards train: batches with data.max_regions=2 hold two regions per image, and
    a single-process run of the smoke model takes two steps on them with a finite region loss.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distributed.launcher import ROOT
from cluster_helpers import job_info, running_cluster

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or shutil.which("sbatch") is None or os.geteuid() != 0,
    reason="needs root and Debian's slurmctld/slurmd/slurm-client (apt-packages.txt)")

CAPTIONS = ["a red car next to a small dog", "two birds on a wire above a green field",
            "a man with a hat and a bicycle", "a white boat on a blue lake", "it is there",
            "an old house behind a tall tree"]
PHRASED = [c for c in CAPTIONS if c != "it is there"]


def _jpeg(rng, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _inputs(d: Path) -> Path:
    """Four shards of six samples (s1 has a corrupt image) and a list file whose last entry
    stalls on the first attempt of the task that reads it."""
    from trainer.data.writer import ShardSink

    rng = np.random.default_rng(0)
    d.mkdir()
    for s in range(4):
        with ShardSink(d, file_name=f"s{s}.tar") as sink:
            for i in range(6):
                w, h = (int(v) for v in rng.integers(40, 96, 2))
                image = b"corrupt" if (s, i) == (1, 2) else _jpeg(rng, w, h)
                caption = CAPTIONS[i] if s == 0 else PHRASED[(i + s) % len(PHRASED)]
                sink.write({"__key__": f"s{s}_{i}", "jpg": image, "txt": caption})
    stall = f'pipe:test "$SLURM_RESTART_COUNT" = 1 || sleep 120; cat {d}/s3.tar'
    (d / "shards.txt").write_text("".join(f"{d}/s{s}.tar\n" for s in range(3)) + stall + "\n")
    return d / "shards.txt"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("label")
    with running_cluster(d / "cluster") as env:
        yield env, d


def _wait(env: dict, job: str, until, what: str, timeout: float = 240) -> dict:
    """Poll `scontrol show job` until `until(info)`; release a requeued task's BeginTime hold
    (SLURM holds it ~2 min; an admin may release it, as tests/slurm/test_slurm.py does)."""
    deadline, held = time.time() + timeout, None
    while time.time() < deadline:
        info = job_info(env, job)
        if until(info):
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held = held or time.time()
            if time.time() - held > 3:  # not at once: the old credential is revoked by the second
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                               check=True, timeout=30)
                held = None
        time.sleep(0.5)
    subprocess.run(["scancel", job.split("_")[0]], env=env, timeout=30)
    pytest.fail(f"job {job}: {what} not reached in {timeout}s: {info}")


def _ended(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def test_label_array_requeued_task_resumes_and_output_trains(cluster, tmp_path):
    from tiny_detectors import build_detector

    env, d = cluster
    shards = _inputs(tmp_path / "in")
    detector = build_detector(tmp_path / "owlv2", "owlv2", score_shift=20.0)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1",
         f"--output={logs}/%a.out", "slurm/label_regions.sh", "--shards", str(shards),
         "--detector", str(detector), "--out", str(out), "--max-regions", "3",
         "--batch-size", "4"], cwd=ROOT, env=dict(env, PY=sys.executable), capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    # task 1: first shard (s2) done, stalled in the second (s3): preempt it
    _wait(env, f"{job}_1", lambda i: (out / "_done/s2.json").is_file() or _ended(i),
          "task 1 finishing its first shard")
    first_pid = json.loads((out / "_done/s2.json").read_text())["pid"]
    assert not (out / "_done/s3.json").exists()
    subprocess.run(["scontrol", "requeue", f"{job}_1"], env=env, check=True, timeout=30)
    infos = [_wait(env, f"{job}_{t}", _ended, f"task {t} ending") for t in (0, 1)]
    text = [(logs / f"{t}.out").read_text() for t in (0, 1)]
    for t, info in enumerate(infos):
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[t][-3000:])
    assert infos[0]["Restarts"] == "0" and infos[1]["Restarts"] == "1", infos
    assert "attempt 2" in text[1] and "task 1 of 2" in text[1]
    # each shard labelled exactly once, by its own task; the requeued task skipped s2
    labelled = re.findall(r" -> (s\d)\.tar: ", "".join(text))
    assert sorted(labelled) == ["s0", "s1", "s2", "s3"], labelled
    assert re.findall(r" -> (s\d)\.tar: ", text[0]) == ["s0", "s1"]
    assert text[1].count("s2.tar: done already, skipped") == 1
    assert json.loads((out / "_done/s2.json").read_text())["pid"] == first_pid
    assert json.loads((out / "_done/s3.json").read_text())["pid"] != first_pid
    report = json.loads((out / "label_regions_report.json").read_text())
    assert report["done"] == 4 and report["samples"] == 24 and report["read_errors"] == []
    assert report["bad_image"] == 1 and report["no_phrase"] == 1
    assert report["labelled"] == 22 and 2 * 22 <= report["regions"] <= 3 * 22  # cap: 3
    _check_training(env, out, tmp_path)


def _check_training(env: dict, out: Path, tmp_path: Path) -> None:
    from trainer.data.config import DataConfig
    from trainer.data.pipeline import build_train_loader

    cfg = DataConfig(train_urls=str(out), batch_size=8, workers=0, image_size=32, max_regions=2,
                     shuffle_buffer=8)
    cfg.tokenizer.context_length = 16
    batch = next(iter(build_train_loader(cfg, rank=0, world=1)))
    per_image = batch["region_mask"].sum(1)
    assert (per_image == 2).sum() >= 6, per_image  # crops may drop a box now and then
    boxes = batch["region_boxes"][batch["region_mask"]]
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml",
         "parallel.ep=1", f"data.train_urls={out}", "data.eval_urls=", "data.max_regions=2",
         "train.steps=2", "data.batch_size=8", "train.micro_batch_size=8", "data.workers=0",
         f"run_dir={run}", f"checkpoint.save_dir={run}/ckpt", "train.progress_bar=false",
         "train.tensorboard=false", "train.log_every=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "region_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["region_loss"]) and r["region_loss"] > 0 for r in steps), steps
