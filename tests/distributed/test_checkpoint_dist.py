"""Full training state through a checkpoint (one torchrun launch, 4 ranks, gloo, CPU, fp32).

Tolerances (tests/distributed/check_checkpoint.py measures):
- resume at the same layout (TP=2 x EP=2, DP=2), model + AdamW + RNG restored: step 3's loss
  and every weight after it equal the uninterrupted run's bit-exact (0.0);
- reload at TP=1 x EP=1, TP=1 x EP=4 and PP=2 x EP=2: gathered weights, exp_avg and exp_avg_sq
  per canonical name equal the saved ones bit-exact, with the same names; every step count
  is 2; rank_state is None (the world layout differs);
- manifest train_state and this rank's rank_state come back equal; RNG draws after a restore
  equal those after the capture.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_full_state(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone",
         str(ROOT / "tests/distributed/check_checkpoint.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in range(4):
        r = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        assert r["rng_roundtrip"] is True, r
        assert r["train_state_ok"] and r["rank_state_ok"], r
        assert len(r["groups"]) >= 2 and r["num_params"] > 0 and r["nonzero_moments"], r
        assert r["saved_steps"] == [2.0] and r["resume_steps"] == [2.0], r
        assert r["resume_loss_a"] == r["resume_loss_b"], r
        assert r["resume_weights"] == 0.0 and r["resume_keys"] == [], r
        for name in ("ep1", "ep4", "pp2ep2"):
            assert r[f"{name}_rank_state"] is None, (name, r)
            assert r[f"{name}_steps"] == [2.0], (name, r)
            for what in ("weights", "exp_avg", "exp_avg_sq"):
                assert r[f"{name}_{what}"] == 0.0, (name, what, r)
                assert r[f"{name}_{what}_keys"] == [], (name, what, r)
