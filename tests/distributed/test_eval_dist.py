"""Evaluation is independent of the data-parallel layout (gloo, CPU, fp32).

tests/distributed/check_eval.py evaluates a tiny MoE CLIP (both towers, EP=2, no token
dropped) with a CLOC prompter at DP=2 on 40 Fashion-MNIST images split unevenly over the ranks
(one rank feeds a padding batch) and saves it; ``tools/evaluate.py`` then loads the checkpoint
in one process (DP=1, EP=1) and evaluates again. Every metric (zero-shot top-1/5, image<->text
and region<->text R@1/5/10, chance levels, counts) must be equal: the DP=2 pass gathers
exactly the rows of the single-process pass, and recalls are counts over ranks that
float-rounding-level differences between the two layouts do not move. The checkpoint exported
with ``tools/convert_checkpoint.py export --to moe`` and evaluated with ``tools/evaluate.py
--exported`` (trainer/hub.py's plain-PyTorch model) gives the same metrics again.

The compute dial on the megatron model: ``tools/evaluate.py --checkpoint --sweep`` at top-k
{2, 1} x eval capacity factor {4, 0.5}: the trained setting (2, 4) reproduces the metrics
exactly, and every row's FLOPs equal trainer/metrics.py's ``inference_flops_per_sample`` of
the saved config with that setting (exact), printed in the table.

CLOC's region counts planned once per step (trainer/step.py ``plan_regions``) at DP=2 x EP=2,
4 micro-batches with different masks per rank: equal (==) to the per-micro-batch EP max and
DP sum they replace; a training step (region + grounding loss) on planned micro-batches equals
the unplanned one bit for bit (metrics ==, gradients 0.0 apart) at both contrastive scopes;
the plan is 1 collective per step, and the step without it makes 2 more integer all-reduces
per micro-batch (9 at step scope: the EP max per forward, the grounding count once) and 2 more
host reads per forward (tests/collective_calls.py, tests/host_reads.py). The evaluation gets
its region rows with its lockstep all-gather: no integer all-reduce, no host read in
trainer/step.py.
"""
import json
import subprocess
import sys

from launcher import ROOT, clean_env, run_check


def run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


M = 4  # check_eval.py's region-plan micro-batches


def check_region_plan(results: list[dict]) -> None:
    """CLOC's region plan at DP=2 x EP=2 (check_eval.py ``region_plan_case``): the numbers,
    bit-identical training steps, and one collective per step where there were 2 per
    micro-batch."""
    local = [r["local_counts"] for r in results]
    for r in results:
        # evaluation: the region rows come with the lockstep all-gather (before: an int
        # all-reduce over EP and 2 host reads in region_inputs per batch)
        assert r["eval_int_all_reduce"] == 0 and r["eval_region_reads"] == 0, r
        # planned == the per-micro-batch EP max and DP sum; with regions on both ranks
        assert r["plan_gc1"] == r["old_gc1"] and r["plan_gc0"] == r["old_gc0"], r
        assert [row for row in r["plan_gc1"]] == [[max(a, b), a + b] for a, b in zip(*local)]
        assert r["plan_gc1_collectives"] == r["plan_gc0_collectives"] == 1, r
        for scope, per_mb in (("microbatch", 2 * M), ("step", 2 * M + 1)):
            p, u = f"{scope}_planned", f"{scope}_unplanned"
            assert r[f"{scope}_metrics_equal"] is True and r[f"{scope}_grad_max_abs"] == 0.0, r
            assert r[f"{scope}_grounding_loss"] > 0.1, r
            # before: an EP max per forward, a DP sum per grounding loss; after: none
            assert r[f"{u}_int_all_reduce"] == per_mb and r[f"{p}_int_all_reduce"] == 0, r
            assert r[f"{u}_collectives"] - r[f"{p}_collectives"] == per_mb, r
            # before: int(mask.sum()) and int(EP max) per forward (2 forwards at step scope)
            forwards = M if scope == "microbatch" else 2 * M
            assert r[f"{u}_host_reads"] - r[f"{p}_host_reads"] == 2 * forwards, r


def test_eval_dp2_equals_dp1_and_export(tmp_path):
    run_check("check_eval.py", 2, tmp_path, timeout=600)
    check_region_plan([json.loads((tmp_path / f"plan_rank{r}.json").read_text())
                       for r in range(2)])
    dp2 = json.loads((tmp_path / "dp2.json").read_text())
    run([str(ROOT / "tools/evaluate.py"), "--checkpoint", str(tmp_path / "ckpt"), "--out",
         str(tmp_path / "dp1.json")])
    report = json.loads((tmp_path / "dp1.json").read_text())
    assert report["layout"] == "tp=1 pp=1 dp=1 ep=1" and report["step"] == 1
    dp1 = report["metrics"]
    assert dp2["eval_images"] == 40 and dp2["regions"] == 40
    assert {"zero_shot_top1", "image_to_text_r10", "region_to_text_r1"} <= set(dp2)
    assert dp1 == dp2
    run([str(ROOT / "tools/convert_checkpoint.py"), "export", "--to", "moe", "--ckpt",
         str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")])
    run([str(ROOT / "tools/evaluate.py"), "--exported", str(tmp_path / "export"), "--eval-urls",
         str(tmp_path / "shards"), "--out", str(tmp_path / "exported.json"),
         "data.eval_batch_size=16", "data.max_regions=1"])
    exported = json.loads((tmp_path / "exported.json").read_text())
    assert exported["step"] == 1 and exported["metrics"] == dp2
    # the compute dial on the checkpoint's megatron model
    table = run([str(ROOT / "tools/evaluate.py"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "sweep.json"), "--sweep", "top_k=2,1",
                 "capacity_factor=4,0.5"])
    rows = json.loads((tmp_path / "sweep.json").read_text())["sweep"]
    assert [(r["top_k"], r["capacity_factor"]) for r in rows] == [(2, 4.0), (2, 0.5),
                                                                 (1, 4.0), (1, 0.5)]
    assert rows[0]["metrics"] == dp2                    # the trained setting
    assert rows[1]["metrics"] != dp2                    # tokens dropped at capacity factor 0.5
    sys.path.insert(0, str(ROOT))
    from trainer.config import config_from_saved, deep_merge
    from trainer.metrics import inference_flops_per_sample

    ckpt = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    saved = json.loads((ckpt / "manifest.json").read_text())["config"]
    for r in rows:
        moe = {"moe": {"top_k": r["top_k"], "eval_capacity_factor": r["capacity_factor"]}}
        cfg = config_from_saved(deep_merge(saved, {"model": {"vision": moe, "text": moe}}))
        assert r["batch_size"] == 16
        assert r["flops"] == inference_flops_per_sample(cfg.model, 16), r
        assert f"{r['flops']['total'] / 1e9:.6g}" in table
