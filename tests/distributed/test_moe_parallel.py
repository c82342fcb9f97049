"""Upcycled MoE CLIP across layouts (one torchrun launch, 4 ranks, gloo, CPU, fp32).

Tolerances (measured values in the issue note):
- function preservation, MoE vs dense embeddings: <= 1e-6 max abs (the issue's bound) at
  EP=1/2/4 and TP=2 x EP=2, top-1 and top-2, capacity and dropless;
- EP=2 / EP=4 / dropless / TP=2 x EP=2 / PP=2 x EP=2 (aux losses on both stages) vs EP=1: loss relative diff <= 1e-6, per-tensor
  gradient relative L2 error <= 1e-5 (top-2 routers without aux losses: absolute <= 1e-7,
  their true gradient is 0 at step 0);
- DeepSpeed's EP / expert-DP groups are megatron's (identity);
- checkpoint TP=2 x EP=2 -> EP=1 and -> EP=4: bit-exact; the upcycle CLI's checkpoint
  preserves function (<= 1e-6) when reloaded at another layout.
"""
import json

from launcher import run_check



def test_moe_layouts(tmp_path):
    run_check("check_moe.py", 4, tmp_path, timeout=900)
    for rank in range(4):
        r = json.loads((tmp_path / f"result_rank{rank}.json").read_text())
        preserve = [k for k in r if k.endswith("_preserve")]
        assert len(preserve) == 11, r
        assert r["cli_rc"] == 0, r
        for k in preserve:
            assert r[k] <= 1e-6, (k, r[k])
        for k in (k for k in r if k.endswith("_groups")):
            assert r[k] is True, k
        compared = [k[:-len("_loss_rel")] for k in r if k.endswith("_loss_rel")]
        assert sorted(compared) == sorted(["ep2_top2", "ep4_top2", "ep2_top1", "ep2_dropless",
                                           "tp2ep2_top2", "tp2ep2_top1", "pp2ep2_top2"]), r
        for name in compared:
            assert r[f"{name}_loss_rel"] <= 1e-6, (name, r)
            assert r[f"{name}_grad_rel"] <= 1e-5, (name, r)
            assert r[f"{name}_grad_keys"] == [], (name, r)
            assert r[f"{name}_router_grad_abs"] <= 1e-7, (name, r)
        assert r["ckpt_to_ep1"] == 0.0 and r["ckpt_to_ep1_keys"] == [], r
        assert r["ckpt_to_ep4"] == 0.0 and r["ckpt_to_ep4_keys"] == [], r
        assert r["ref_loss"] > 0.1
