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
"""
import json
import subprocess
import sys

from launcher import ROOT, clean_env, run_check


def run(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, *args], env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_eval_dp2_equals_dp1_and_export(tmp_path):
    run_check("check_eval.py", 2, tmp_path, timeout=600)
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
