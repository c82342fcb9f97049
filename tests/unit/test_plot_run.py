"""tools/plot_run.py on metrics written by the trainer's own MetricsLogger (one process, CPU).

- an MoE run: training.png, eval.png, moe_load.png and moe_routing.png are written, decode as
  PNGs of the expected size and are not blank;
- a dense run without evaluations: only training.png;
- a restarted run (steps logged twice): the row logged last wins;
- MoE layers in tower-then-depth order; bad input: one ``error:`` line, exit 2.
"""
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import plot_run  # noqa: E402


def write_run(run_dir: Path, moe: bool = True, evals: bool = True, restart_at: int = 0) -> None:
    from trainer.metrics import MetricsLogger

    log = MetricsLogger(run_dir, True, 60, 0, tensorboard=False, progress_bar=False)
    steps = list(range(10, 61, 10))
    if restart_at:
        steps += list(range(restart_at, 61, 10))
    for i, step in enumerate(steps):
        rec = {"loss": 5 - 0.05 * i, "contrastive_loss": 3 - 0.02 * i, "region_loss": 2.5,
               "lr": 1e-3, "grad_norm": 2.0 + i, "samples_per_s": 100.0 + i}
        if moe:
            shift = 0.05 * math.sin(i)
            rec["moe"] = {layer: {"load": [0.25 + shift, 0.25 - shift, 0.3, 0.2],
                                  "dropped": 0.01 * i, "entropy": 1.3, "load_balance": 1.02}
                          for layer in ("text.1", "vision.3", "vision.1")}
        log.log(step, rec)
        if evals and step % 20 == 0:
            log.log(step, {"eval/zero_shot_top1": 0.1 * i, "eval/zero_shot_top5": 0.2 * i,
                           "eval/image_to_text_r1": 0.05 * i, "eval/image_to_text_r1_chance": 0.1,
                           "eval/text_to_image_r1": 0.07 * i, "eval/eval_images": 100})
    log.close()


def check_png(path: Path, width: int, height: int) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width), (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} looks blank"


def test_moe_run_plots(tmp_path):
    write_run(tmp_path)
    paths = plot_run.plot_run(tmp_path)
    assert [p.name for p in paths] == ["training.png", "eval.png", "moe_load.png",
                                       "moe_routing.png"]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    check_png(paths[0], 1210, 770)    # 11 x 7 in at 110 dpi
    check_png(paths[1], 1100, 440)    # two eval panels (no region metrics)
    check_png(paths[2], 1320, 2 * 286 + 66)  # 3 layers: 2 x 2 grid
    check_png(paths[3], 1650, 440)


def test_dense_run_without_evals(tmp_path):
    write_run(tmp_path, moe=False, evals=False)
    out = tmp_path / "elsewhere"
    assert plot_run.main([str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["training.png"]


def test_restarted_run_last_row_wins(tmp_path):
    write_run(tmp_path, restart_at=40)
    rows = plot_run.read_metrics(tmp_path)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[3]["loss"] == pytest.approx(5 - 0.05 * 6)  # 40 logged again as the 7th row
    assert plot_run.series(rows, "eval/zero_shot_top1")[0] == [20, 40, 60]
    assert plot_run.moe_layers(rows) == ["vision.1", "vision.3", "text.1"]


def test_bad_input_one_error_line(tmp_path, capsys):
    assert plot_run.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "metrics.jsonl" in err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(plot_run.PlotError, match="metrics.jsonl:2: not JSON"):
        plot_run.read_metrics(tmp_path)


def test_summarize_run_prints_every_eval_metric(tmp_path, capsys):
    import summarize_run

    write_run(tmp_path)
    assert summarize_run.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loss: step 10 5.0000 -> step 60 4.7500" in out
    evals = [line for line in out.splitlines() if line.strip().startswith("step")]
    assert evals and all("zero-shot top-1" in line and "image->text R@1" in line for line in evals)
    with pytest.raises(SystemExit, match="metrics.jsonl does not exist"):
        summarize_run.main([str(tmp_path / "missing")])
