"""Upcycled MoE CLIP across layouts (one torchrun launch, 4 ranks, gloo, CPU, fp32).

Tolerances (measured values in the issue note):
- function preservation, MoE vs dense embeddings: <= 1e-6 max abs (the issue's bound) at
  EP=1/2/4 and TP=2 x EP=2, top-1 and top-2, capacity and dropless;
- EP=2 / EP=4 / dropless / TP=2 x EP=2 / PP=2 x EP=2 (aux losses on both stages) vs EP=1: loss relative diff <= 1e-6, per-tensor
  gradient relative L2 error <= 1e-5 (top-2 routers without aux losses: absolute <= 1e-7,
  their true gradient is 0 at step 0);
- DeepSpeed's EP / expert-DP groups are megatron's (identity);
- checkpoint TP=2 x EP=2 -> EP=1 and -> EP=4: bit-exact; the upcycle CLI's checkpoint
  preserves function (<= 1e-6) when reloaded at another layout;
- every expert of every MoE layer gets tokens (> 0 kept routes) in each function-preservation
  forward (identical experts cannot show a token sent to the wrong expert);
- distinct experts (seeded per-expert noise, identical at every layout; they shift the loss by
  > 1%, measured 5.5%): the same layouts vs EP=1, loss relative <= 1e-6, embeddings max abs
  <= 1e-5 (pp=1), gradient relative L2 error <= 1e-5 per tensor and per expert, routers
  included (measured <= 1e-6); EP=1 over DP=4 vs one process on the global batch: the same;
- global grad norm at EP=2 / EP=4 / dropless / TP=2 x EP=2 / PP=2 x EP=2 vs the float64 norm
  of one process's full gradient: relative <= 1e-5 (measured <= 3.3e-7); clipped to half that
  norm, gradients relative <= 1e-5 per tensor / expert and their norm = max_norm <= 1e-5;
- TP=2 x DP=2 with the global contrastive loss on (dense) vs one process on the 16-sample
  global batch as one contrastive batch: loss relative <= 1e-6 (measured 0), gradients
  relative <= 1e-5 (measured 1.2e-6), grad norm relative <= 1e-5;
- CLOC's region plan (trainer/step.py ``plan_regions``) at DP=4 x EP=1, DP=4 x EP=2, EP=4,
  TP=2 x EP=2, PP=2 x EP=2, global contrastive on and off: equal (==) to the per-micro-batch EP max and
  DP sum it replaces, and to the sums / maxima of the ranks' own counts.
"""
import json

from launcher import run_check



def check_region_plan(results: list[dict]) -> None:
    """CLOC's region plan (one all-gather per step) equals the per-micro-batch EP max and DP
    sum it replaces, on every rank and layout; at DP=4 x EP=2 the loss's count is the sum of
    the 4 ranks' counts, at EP=4 the rows are their max, and without global contrastive the
    count is the rank's own."""
    plans = [k for k in results[0] if k.startswith("region_plan_") and k.endswith(("0", "1"))]
    assert len(plans) == 10, plans
    for r in results:
        for k in plans:
            assert r[k] == r[k + "_old"], (k, r[k], r[k + "_old"])
            if k.endswith("gc0"):
                assert [t for _, t in r[k]] == r[k + "_local"], (k, r)
    for k, column, fn in (("region_plan_ep2_gc1", 1, sum), ("region_plan_ep4_gc1", 0, max),
                          ("region_plan_ep1_gc1", 1, sum)):
        want = [fn(col) for col in zip(*(r[k + "_local"] for r in results))]
        assert all([row[column] for row in r[k]] == want for r in results), (k, want)


def test_moe_layouts(tmp_path):
    run_check("check_moe.py", 4, tmp_path, timeout=900)
    check_region_plan([json.loads((tmp_path / f"result_rank{rank}.json").read_text())
                       for rank in range(4)])
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

        reached = [k[:-len("_reached_min")] for k in r if k.endswith("_reached_min")]
        assert len(reached) == len(preserve), r
        for name in reached:
            assert r[f"{name}_reached_min"] > 0 and r[f"{name}_unreached"] == [], (
                name, r[f"{name}_unreached"])

        assert r["distinct_loss_shift"] > 1e-2, r  # the experts do differ
        distinct = [k[:-len("_distinct_loss_diff")] for k in r if k.endswith("_distinct_loss_diff")]
        assert sorted(distinct) == sorted(compared), r
        for name in distinct:
            assert r[f"{name}_distinct_loss_diff"] <= 1e-6, (name, r[f"{name}_distinct_loss_diff"])
            assert r[f"{name}_distinct_grad_rel"] <= 1e-5, (name, r[f"{name}_distinct_grad_rel"])
            assert r[f"{name}_distinct_grad_keys"] == [], (name, r)
            if not name.startswith("pp"):
                assert r[f"{name}_distinct_embed"] <= 1e-5, (name, r[f"{name}_distinct_embed"])
        for name in ("ep1_top2", "ep1_noaux"):
            assert r[f"{name}_solo_loss_diff"] <= 1e-6, (name, r[f"{name}_solo_loss_diff"])
            assert r[f"{name}_solo_grad_rel"] <= 1e-5, (name, r[f"{name}_solo_grad_rel"])
            assert r[f"{name}_solo_grad_keys"] == [], (name, r)

        normed = [k[:-len("_ref_norm")] for k in r if k.endswith("_ref_norm")]
        assert sorted(normed) == sorted(["ep2_top2", "ep4_top2", "ep2_dropless", "tp2ep2_top2",
                                         "pp2ep2_top2"]), r
        for name in normed:
            assert r[f"{name}_ref_norm"] > 1.0, (name, r)
            assert r[f"{name}_norm_rel"] <= 1e-5, (name, r[f"{name}_norm"],
                                                   r[f"{name}_ref_norm"])
            assert r[f"{name}_clip_returned_rel"] <= 1e-5, (name, r)
            assert r[f"{name}_clipped_norm_rel"] <= 1e-5, (name, r[f"{name}_clipped_norm_rel"])
            assert r[f"{name}_clip_rel"] <= 1e-5, (name, r[f"{name}_clip_rel"])
            assert r[f"{name}_clip_keys"] == [], (name, r)

        assert r["tp2_global_dp"] == 2, r
        assert r["tp2_global_loss_diff"] <= 1e-6, (r["tp2_global_loss"], r["tp2_global_loss_diff"])
        assert r["tp2_global_grad_rel"] <= 1e-5, r["tp2_global_grad_rel"]
        assert r["tp2_global_grad_keys"] == [], r
        assert r["tp2_global_grad_norm_rel"] <= 1e-5, r["tp2_global_grad_norm_rel"]
