#!/usr/bin/env python
"""Evaluate a training checkpoint (dense or MoE) or an exported model: zero-shot
classification, image-text retrieval Recall@1/5/10 and CLOC region retrieval, as JSON. The
same code as the in-training eval hook (trainer/eval/).

  python tools/evaluate.py --checkpoint runs/smoke/moe/ckpt --out runs/smoke/moe/eval.json
  python tools/evaluate.py --exported exports/smoke-moe --eval-urls data/smoke/fmnist-eval
  python tools/evaluate.py --checkpoint CKPT --eval-urls 'data/val-{000..007}.tar'
  python tools/evaluate.py --checkpoint CKPT --csv data/coco/val.csv \\
      eval.csv_image_key=filepath eval.csv_caption_key=title eval.tasks=[retrieval]
  torchrun --nproc_per_node=2 tools/evaluate.py --checkpoint runs/smoke/moe/ckpt parallel.ep=2
  python tools/evaluate.py --checkpoint CKPT --out sweep.json --sweep capacity_factor=1,1.5,2 top_k=1,2

The model, data transform and tokenizer settings come from the config saved in the checkpoint;
``key=value`` overrides go on top (``data.eval_batch_size=256``, ``eval.tasks=[retrieval]``,
``eval.templates=[...]``). The layout defaults to tp=pp=ep=1 whatever it was trained at (the
checkpoint reshards on load); every process beyond tp*pp is data parallel and evaluates a part
of the set. Without ``--eval-urls``/``--csv``, the run's own eval set (``data.eval_urls`` or
``eval.csv``) is used.

``--exported DIR`` (``tools/convert_checkpoint.py export --to moe``: config.json +
model.safetensors) runs trainer/hub.py's plain-PyTorch model in one process, with the image
size, normalisation and tokenizer of its config.json; it needs ``--eval-urls`` or ``--csv``
and reads up to ``data.max_regions`` (default 8 when the model has a CLOC prompter) regions
per image, ``data.eval_batch_size`` (default 128) samples per batch.

``--sweep capacity_factor=... top_k=...`` (trainer/eval/sweep.py) evaluates the one model at
each setting of the grid (evaluation routing of every MoE layer) and prints a table of
inference FLOPs per image-text pair (trainer/metrics.py ``inference_flops_per_sample``, routing
groups of ``data.eval_batch_size``) against the metrics; the JSON holds the rows as ``sweep``.

Exit codes: 0 done, 2 bad input (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import (Config, ConfigError, config_from_saved, deep_merge,  # noqa: E402
                            parse_overrides)

log = logging.getLogger("upclip")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint",
                       help="a checkpoint directory, or a save_dir whose 'latest' names one")
    model.add_argument("--exported", help="an export directory (config.json + model.safetensors)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--eval-urls", help="WebDataset shards (any data.eval_urls spec)")
    src.add_argument("--csv", help="CSV eval set (columns: eval.csv_image_key, "
                                   "eval.csv_caption_key, optional eval.csv_label_key)")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2",
                   help="evaluate at each capacity_factor / top_k (the grid of the lists)")
    return p.parse_args(argv)


def _eval_set(args: argparse.Namespace) -> dict:
    if args.eval_urls:
        return {"data": {"eval_urls": args.eval_urls}, "eval": {"csv": ""}}
    if args.csv:
        return {"eval": {"csv": args.csv}}
    return {}


def build_config(args: argparse.Namespace) -> tuple[Config, dict]:
    """(config, manifest): the checkpoint's saved config < eval defaults < the command line."""
    from trainer.checkpoint import read_manifest

    manifest = read_manifest(args.checkpoint)
    saved = manifest.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{args.checkpoint}: its manifest has no saved config")
    top: dict = {"parallel": {"tp": 1, "pp": 1, "ep": 1, "vision_layers_last_stage": -1},
                 "checkpoint": {"load": "", "upcycle_from": "", "save_dir": ""}}
    raw = deep_merge(deep_merge(saved, top), _eval_set(args))
    return config_from_saved(deep_merge(raw, parse_overrides(args.overrides))), manifest


def build_export_config(args: argparse.Namespace) -> tuple[Config, dict]:
    """(config, export config.json): model, tokenizer and preprocessing of the export <
    the command line. Raises ConfigError without an eval set."""
    from trainer.hub import read_config

    export = read_config(args.exported)
    if not (args.eval_urls or args.csv):
        raise ConfigError("--exported needs --eval-urls or --csv (an export carries no eval set)")
    pre, model = export.get("preprocess", {}), export["model"]
    data = {"image_size": pre.get("image_size", model["vision"]["image_size"]),
            "tokenizer": dict(export["tokenizer"],
                              context_length=model["text"]["context_length"]),
            "max_regions": 8 if model.get("prompter", {}).get("layers") else 0,
            "eval_batch_size": 128,
            "augment": {k: pre[k] for k in ("mean", "std", "interpolation") if k in pre}}
    raw = deep_merge({"model": model, "data": data}, _eval_set(args))
    return config_from_saved(deep_merge(raw, parse_overrides(args.overrides))), export


def _evaluate(model, cfg: Config, sweep, evaluate_once):
    """evaluate_once() or, with ``--sweep``, the sweep's rows (trainer/eval/sweep.py)."""
    if not sweep:
        return evaluate_once()
    from trainer.eval.sweep import run_sweep

    batch = cfg.data.eval_batch_size or cfg.data.batch_size
    return run_sweep(model, cfg.model, sweep, batch, evaluate_once, log.info)


def evaluate_checkpoint(cfg: Config, checkpoint: str, launch, layout,
                        sweep=None) -> dict | list | None:
    """Collective. Builds this rank's part of the model, loads the checkpoint (any saved
    layout) and evaluates; the metrics on the reporting rank, None elsewhere."""
    from trainer import checkpoint as ckpt
    from trainer.data import build_tokenizer
    from trainer.distributed import init_distributed
    from trainer.distributed.device import default_device
    from trainer.eval import evaluate
    from trainer.models.build import build_model

    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    if launch.rank == 0:
        log.info("%s; layout %s", launch.describe(), layout.describe())
    model = build_model(cfg.model, layout, parallel=cfg.parallel, inference=True)
    model.to(default_device())
    ckpt.load_model(checkpoint, model, layout)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    result = _evaluate(model, cfg, sweep, lambda: evaluate(model, cfg, layout, tokenizer))
    reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    return result if reporter else None


def evaluate_export(cfg: Config, directory: str, sweep=None) -> dict | list:
    """One process: trainer/hub.py's model of ``directory`` through ``embed_plain``."""
    import torch

    from trainer import hub
    from trainer.eval import compute_metrics
    from trainer.distributed.device import default_device
    from trainer.eval.embed import embed_plain, eval_batches

    device = default_device()
    model = hub.load(directory, device=device)
    tokenizer = hub.load_tokenizer(directory)
    tasks = tuple(cfg.eval.tasks)
    a = cfg.data.augment

    @torch.no_grad()
    def once() -> dict:
        emb = embed_plain(model, eval_batches(cfg, 0, 1, tokenizer), device,
                          text="retrieval" in tasks or "regions" in tasks,
                          regions="regions" in tasks and hasattr(model, "prompter"),
                          mean=a.mean, std=a.std)
        return compute_metrics(emb, cfg, model.encode_text, tokenizer, device, tasks)
    return _evaluate(model, cfg, sweep, once)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    try:
        from trainer.checkpoint import CheckpointError, resolve
        from trainer.distributed.launch import LaunchError, read_launch_env
        from trainer.distributed.layout import LayoutError, ParallelLayout
        from trainer.eval.embed import EvalSetError, check_eval_set, describe_eval_set
        from trainer.eval.sweep import SweepError, check_sweep, parse_sweep
        from trainer.hub import HubError

        sweep = parse_sweep(args.sweep) if args.sweep else None
        launch = read_launch_env()
        if args.exported:
            cfg, export = build_export_config(args)
            if launch.world_size > 1:
                raise ConfigError(f"--exported runs in one process (world size "
                                  f"{launch.world_size}): start it without torchrun")
            source = {"exported": str(args.exported), "step": export.get("source", {}).get("step")}
        else:
            cfg, manifest = build_config(args)
            layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp,
                                    cfg.parallel.ep)
            checkpoint = resolve(args.checkpoint)
            source = {"checkpoint": str(checkpoint), "step": manifest["step"]}
        check_eval_set(cfg)
        if sweep:
            check_sweep(cfg, sweep)
    except (ConfigError, CheckpointError, EvalSetError, HubError, LaunchError,
            LayoutError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.exported:
            result = evaluate_export(cfg, args.exported, sweep)
            where = "1 process (trainer/hub.py)"
        else:
            result = evaluate_checkpoint(cfg, str(checkpoint), launch, layout, sweep)
            where = layout.describe()
    except EvalSetError as e:  # e.g. no class names for a labelled set
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None:
        from trainer.eval import format_metrics
        from trainer.eval.sweep import format_table

        report = {**source, "eval_set": describe_eval_set(cfg), "tasks": list(cfg.eval.tasks),
                  "templates": list(cfg.eval.templates), "world_size": launch.world_size,
                  "layout": where, "seconds": round(time.time() - t0, 1),
                  **({"sweep": result} if sweep else {"metrics": result})}
        if sweep:  # the table on stdout, or on stderr when stdout carries the JSON
            print(format_table(result), file=sys.stdout if args.out else sys.stderr)
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
            log.info("step %s: %s -> %s", source["step"], f"{len(result)} settings" if sweep
                     else format_metrics(result), args.out)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
