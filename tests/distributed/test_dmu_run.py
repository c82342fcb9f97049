"""DMU end to end on CPU (``python -m trainer.dmu``, one process, gloo, fp32) with
configs/dmu_tiny.yaml on 512 Fashion-MNIST images: a dense tiny CLIP (trained 20 steps here),
two MCL stages on label-grouped batches, assembly into a 3-expert MoE, the router phase.

- Every phase finishes and marks itself done; the stage-2 groups refine the stage-1 groups.
- Assembly: each expert forced on every unit reproduces its source model's embeddings on a
  probe batch within 1e-6 (measured 0), and the experts differ pairwise (mean relative
  distance > 0.01; measured ~0.26-0.34).
- Resume: SIGUSR1 during stage 2 exits 3 after saving; the rerun skips stage 1 (its checkpoint
  untouched), resumes stage 2 from its latest checkpoint with the label-grouped data position,
  and every stage-2 loss equals the uninterrupted run's within 1e-6 (measured: identical); a
  third run finds everything done.
- Mobile V-MoE: ``python -m trainer.dmu.superclass`` clusters the 10 class names into 4
  super-classes with the dense model's text tower; configs/mobile_vmoe_tiny.yaml upcycles the
  dense model with that map (image routing, super-class router loss) and trains 4 steps.
"""
import json
import signal
import sys
import time
from pathlib import Path

import pytest

from launcher import ROOT, finish, losses, start

CONFIG = str(ROOT / "configs/dmu_tiny.yaml")
MOBILE = str(ROOT / "configs/mobile_vmoe_tiny.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.data import sources
    from trainer.data.writer import write_shards

    root = tmp_path_factory.mktemp("dmu")
    (root / "train").mkdir()
    write_shards(sources.fashion_mnist("train", count=512), root / "train", "fmnist", 128,
                 info={"classnames": list(sources.FASHION_MNIST_CLASSES)})
    rc, out = finish(start([
        sys.executable, "-m", "trainer.train", "--config", CONFIG,
        "model.vision.moe.num_experts=0", "model.text.moe.num_experts=0", "train.trainable=[]",
        "train.steps=20",
        "train.warmup_steps=5", "checkpoint.save_every=0", f"data.train_urls={root / 'train'}",
        f"run_dir={root / 'dense'}", f"checkpoint.save_dir={root / 'dense/ckpt'}"],
        root / "dense.log"))
    assert rc == 0, out[-4000:]
    return root


def dmu_args(root: Path, run: str) -> list[str]:
    return [sys.executable, "-m", "trainer.dmu", "--config", CONFIG,
            f"dmu.dense={root / 'dense/ckpt'}", f"data.train_urls={root / 'train'}",
            f"run_dir={root / run}"]


@pytest.fixture(scope="module")
def full(setup):
    t0 = time.time()
    rc, out = finish(start(dmu_args(setup, "full"), setup / "full.log"))
    assert rc == 0, out[-5000:]
    return setup / "full", time.time() - t0


def test_dmu_end_to_end(full):
    run, seconds = full
    for phase in ("stage_1", "stage_2", "assembled", "router"):
        assert (run / phase / "DONE.json").is_file(), phase
    info = json.loads((run / "assembled/DONE.json").read_text())
    eq, dist = info["forced_expert_max_abs_diff"], info["expert_relative_distance"]
    assert len(eq) == 3 and max(eq) <= 1e-6, eq
    assert all(dist[a][b] > 0.01 for a in range(3) for b in range(3) if a != b), dist
    t1 = json.loads((run / "stage_1/labels.json").read_text())["labels"]
    t2 = json.loads((run / "stage_2/labels.json").read_text())["labels"]
    assert len(t1) == len(t2) == 512
    parent = {}
    for key, g in t2.items():
        parent.setdefault(g, set()).add(t1[key])
    assert all(len(v) == 1 for v in parent.values())     # accumulated labels refine
    curves = {p: losses(run / p) for p in ("stage_1", "stage_2", "router")}
    assert sorted(curves["stage_1"]) == sorted(curves["stage_2"]) == list(range(1, 13))
    assert sorted(curves["router"]) == list(range(1, 7))
    assert curves["stage_1"] != curves["stage_2"]
    rows = [json.loads(x) for x in (run / "router/metrics.jsonl").read_text().splitlines()]
    assert all("moe" in r for r in rows if "loss" in r)
    print(f"\nDMU tiny run: {seconds:.0f}s; losses per phase (first, last): "
          + "; ".join(f"{p} {c[1]:.4f} -> {c[max(c)]:.4f}" for p, c in curves.items())
          + f"; forced-expert max |diff| {eq}; relative expert distances {dist}")


def test_dmu_resume_skips_finished_stage(setup, full):
    ref_run, _ = full
    run = setup / "resume"
    proc = start(dmu_args(setup, "resume"), setup / "resume1.log")
    t0 = time.time()
    while not ((run / "stage_2/metrics.jsonl").is_file() and 5 in losses(run / "stage_2")):
        assert proc.poll() is None, finish(proc)[1][-4000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 3, out[-4000:]
    assert (run / "stage_1/DONE.json").is_file() and not (run / "stage_2/DONE.json").exists()
    stopped = (run / "stage_2/ckpt/latest").read_text().strip()
    stage1 = sorted(p.name for p in (run / "stage_1/ckpt").iterdir())

    rc, out = finish(start(dmu_args(setup, "resume"), setup / "resume2.log"))
    assert rc == 0, out[-4000:]
    assert "dmu: stage 1/2 done" in out and f"resumed from {run / 'stage_2/ckpt' / stopped}" in out
    assert sorted(p.name for p in (run / "stage_1/ckpt").iterdir()) == stage1
    for phase in ("stage_1", "stage_2"):
        ref, got = losses(ref_run / phase), losses(run / phase)
        assert sorted(got) == sorted(ref)
        assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-6, (phase, got, ref)
    a = json.loads((run / "assembled/DONE.json").read_text())["expert_relative_distance"]
    b = json.loads((ref_run / "assembled/DONE.json").read_text())["expert_relative_distance"]
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= 1e-6

    rc, out = finish(start(dmu_args(setup, "resume"), setup / "resume3.log"))
    assert rc == 0 and "router phase done" in out, out[-3000:]


def test_mobile_vmoe_superclasses_then_training(setup):
    out = setup / "superclasses.json"
    rc, log = finish(start([sys.executable, "-m", "trainer.dmu.superclass", "--config", MOBILE,
                            "--checkpoint", str(setup / "dense/ckpt"), "--experts", "4",
                            "--out", str(out), "--classnames-from", str(setup / "train")],
                           setup / "superclass.log"))
    assert rc == 0, log[-4000:]
    got = json.loads(out.read_text())
    assert len(got["superclass_of_class"]) == 10 and got["classnames"][0] == "t-shirt"
    assert set(got["superclass_of_class"]) <= set(range(4))
    run = setup / "mobile"
    rc, log = finish(start([
        sys.executable, "-m", "trainer.train", "--config", MOBILE,
        f"checkpoint.upcycle_from={setup / 'dense/ckpt'}",
        f"model.vision.moe.superclass_map={out}", "train.steps=4", "train.log_every=1",
        "train.warmup_steps=0", "train.micro_batch_size=16", "data.batch_size=16",
        "data.workers=0", f"data.train_urls={setup / 'train'}", "data.eval_urls=",
        "train.tensorboard=false", "train.progress_bar=false", f"run_dir={run}",
        f"checkpoint.save_dir={run / 'ckpt'}"], setup / "mobile.log"))
    assert rc == 0, log[-4000:]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert "upcycled vision blocks [1]: 4 experts, top-1" in log
