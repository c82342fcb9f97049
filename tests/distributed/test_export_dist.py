"""An upcycled-then-trained MoE CLIP through export and reshard (one torchrun launch, 4 ranks,
gloo, CPU, fp32; tests/distributed/check_export.py measures).

Tolerances:
- ``export --to moe`` loaded by the plain model (trainer/hub.py) vs the TP=2 x EP=2
  distributed model, image and text embeddings: max abs <= 1e-5 (measured 4.8e-7: the same
  math with other matmul splits); the experts really differ after training (> 1e-4);
- ``reshard`` TP=2 x EP=2 -> TP=1 x EP=1: the resharded model's embeddings vs the TP=2 x EP=2
  model's <= 1e-5 (measured 4.8e-7); its weights, exp_avg and exp_avg_sq per canonical name
  equal the original checkpoint's loaded at the same layout bit-exact (0.0), with the same
  names; AdamW step counts 3; the next step's loss equals the original's bit-exact; the new
  manifest says tp=1 ep=1 (world 4, dp 4) in its layout and config, step 3, train_state kept.
"""
import json

from launcher import run_check


def test_export_and_reshard_trained_moe(tmp_path):
    run_check("check_export.py", 4, tmp_path, timeout=600)
    for rank in range(4):
        r = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        assert r["experts_diverged"] > 1e-4, r
        if rank == 0:
            assert r["hub_is_plain"] is True, r
            assert r["hub_vs_tp2ep2"] <= 1e-5, r
        assert r["reshard_vs_tp2ep2"] <= 1e-5, r
        for what in ("weights", "exp_avg", "exp_avg_sq"):
            assert r[what] == 0.0 and r[f"{what}_keys"] == [], (what, r)
        assert r["reshard_steps"] == [3.0], r
        assert r["reshard_loss_4"] == r["direct_loss_4"], r
        assert r["reshard_layout"] == {"world_size": 4, "tp": 1, "pp": 1, "dp": 4, "ep": 1}, r
        assert (r["reshard_parallel"]["tp"], r["reshard_parallel"]["ep"]) == (1, 1), r
        assert r["reshard_step"] == 3, r
        assert r["reshard_train_state"] == {"step": 3, "consumed_samples": 24}, r
