#!/usr/bin/env python
"""PNG plots of a run from its metrics.jsonl (as trainer/train.py writes it): no TensorBoard.

  python tools/plot_run.py runs/smoke/dense runs/smoke/moe          # -> RUN/plots/*.png
  python tools/plot_run.py runs/smoke/moe --out /tmp/plots          # -> /tmp/plots/*.png

Per run:
  training.png     loss (total, contrastive, region), learning rate, gradient norm, samples/s
  eval.png         zero-shot top-1/top-5, retrieval and region retrieval R@1/5/10 (dashed:
                   a random ranking's value); only when the run evaluated
  moe_load.png     per MoE layer a heatmap: expert (rows) x logged step (columns), the fraction
                   of routed tokens each expert received (uniform = 1/E); MoE runs only
  moe_routing.png  per MoE layer: fraction of wanted routes dropped at capacity, mean router
                   entropy, load-balance aux value; MoE runs only

A run restarted from a checkpoint appends to metrics.jsonl and logs some steps again: the row
logged last for a step wins.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TRAIN_PANELS = (("loss", ("loss", "contrastive_loss", "region_loss"), "linear"),
                ("learning rate", ("lr",), "linear"),
                ("gradient norm", ("grad_norm",), "log"),
                ("throughput (samples/s)", ("samples_per_s",), "linear"))
EVAL_PANELS = (("zero-shot accuracy", ("zero_shot_top1", "zero_shot_top5")),
               ("image-text retrieval", ("image_to_text_r1", "image_to_text_r5",
                                         "text_to_image_r1", "text_to_image_r5")),
               ("region retrieval (CLOC)", ("region_to_text_r1", "region_to_text_r5",
                                            "text_to_region_r1", "text_to_region_r5")))


class PlotError(ValueError):
    pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` by step (the last row logged for a step and kind
    wins), training rows and eval rows apart from each other."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist (is {run_dir} a run_dir of trainer/train.py?)")
    by_key: dict[tuple[int, bool], dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise PlotError(f"{path}:{n}: expected an object with an integer 'step'")
        is_eval = any(k.startswith("eval/") for k in row)
        by_key[(row["step"], is_eval)] = row
    return [by_key[k] for k in sorted(by_key)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key``."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_training(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = _pyplot()
    panels = [(name, [k for k in keys if series(rows, k)[0]], scale)
              for name, keys, scale in TRAIN_PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, keys, scale) in zip(axes.flat, panels):
        for k in keys:
            ax.plot(*series(rows, k), marker=".", label=k)
        ax.set(title=name, xlabel="step", yscale=scale)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path, title)


def plot_eval(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = _pyplot()
    panels = [(name, [k for k in keys if series(rows, f"eval/{k}")[0]])
              for name, keys in EVAL_PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for i, k in enumerate(keys):
            color = f"C{i}"
            ax.plot(*series(rows, f"eval/{k}"), marker="o", color=color, label=k)
            steps, chance = series(rows, f"eval/{k}_chance")
            if steps:
                ax.plot(steps, chance, ls="--", lw=1, color=color, alpha=0.6)
        ax.set(title=name + " (dashed: chance)" if "retrieval" in name else name,
               xlabel="step", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, title)


def moe_layers(rows: list[dict]) -> list[str]:
    """MoE layer names in tower then depth order (``vision.1``, ``vision.3``, ``text.1``)."""
    names = {n for r in rows for n in (r.get("moe") or {})}
    tower_order = {"vision": 0, "text": 1}

    def key(n: str):
        tower, _, idx = n.partition(".")
        return tower_order.get(tower, 2), tower, int(idx) if idx.isdigit() else 0
    return sorted(names, key=key)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 2)
    return math.ceil(n / cols), cols


def plot_moe_load(rows: list[dict], path: Path, title: str) -> Path | None:
    import numpy as np

    plt = _pyplot()
    layers = moe_layers(rows)
    if not layers:
        return None
    nr, nc = _grid(len(layers))
    fig, axes = plt.subplots(nr, nc, figsize=(6 * nc, 2.6 * nr + 0.6), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        logged = [r for r in rows if layer in (r.get("moe") or {})]
        load = np.array([r["moe"][layer]["load"] for r in logged]).T       # [E, steps]
        steps = [r["step"] for r in logged]
        num_experts = load.shape[0]
        im = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0, vmax=max(float(load.max()), 2.0 / num_experts))
        ticks = (np.arange(len(steps)) if len(steps) <= 12 else
                 np.linspace(0, len(steps) - 1, 8).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_yticks(range(num_experts), [str(e) for e in range(num_experts)])
        ax.set(title=f"{layer}: token fraction per expert (uniform {1 / num_experts:.3g})",
               xlabel="step", ylabel="expert")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    return _save(fig, path, title)


def plot_moe_routing(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = _pyplot()
    layers = moe_layers(rows)
    if not layers:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    experts = max(len(r["moe"][n]["load"]) for r in rows for n in (r.get("moe") or {}))
    stats = (("dropped", "fraction of routes dropped"),
             ("entropy", f"mean router entropy (uniform over {experts}: {math.log(experts):.3f})"),
             ("load_balance", "load-balance aux value (balanced: 1)"))
    for ax, (stat, name) in zip(axes, stats):
        for layer in layers:
            logged = [r for r in rows if stat in (r.get("moe") or {}).get(layer, {})]
            ax.plot([r["step"] for r in logged], [r["moe"][layer][stat] for r in logged],
                    marker=".", label=layer)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    return _save(fig, path, title)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every plot the run's metrics allow, as PNGs in ``out_dir`` (default RUN/plots)."""
    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = str(run_dir).rstrip("/")
    train = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    made = [plot_training(train, out / "training.png", f"{name}: training"),
            plot_eval(evals, out / "eval.png", f"{name}: evaluation"),
            plot_moe_load(train, out / "moe_load.png", f"{name}: expert load"),
            plot_moe_routing(train, out / "moe_routing.png", f"{name}: routing")]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/plot_run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", help="output folder (one run) or parent of one folder per run")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for run in args.runs:
        out = None
        if args.out:
            out = Path(args.out) / Path(run).name if len(args.runs) > 1 else Path(args.out)
        try:
            paths = plot_run(run, out)
        except PlotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
