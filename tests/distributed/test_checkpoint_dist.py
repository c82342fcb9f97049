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

from launcher import run_check



def test_checkpoint_full_state(tmp_path):
    run_check("check_checkpoint.py", 4, tmp_path, timeout=900)
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
