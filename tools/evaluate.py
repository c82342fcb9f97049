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
of the set. Without ``--eval-urls``/``--csv``, the run's own eval sets (``data.eval_urls`` or
``eval.csv``, and ``eval.sets``) are used; ``--eval-urls`` accepts clip_benchmark's
webdataset split (a folder with nshards.txt). Several sets in one call, each reported under
``sets.<name>``:

  python tools/evaluate.py --exported exports/b16 \
      'eval.sets={imagenet: {urls: wds_imagenet1k/test, classnames: imagenet,
                 templates: openai_imagenet}, coco: {urls: wds_mscoco/test, tasks: [retrieval]}}'

``--sweep capacity_factor=... top_k=...`` (trainer/eval/sweep.py) evaluates the one model at
each setting of the grid (evaluation routing of every MoE layer) and prints a table of
inference FLOPs per image-text pair (trainer/metrics.py ``inference_flops_per_sample``, routing
groups of ``data.eval_batch_size``) against the metrics (a named set's as ``<name>/<metric>``);
the JSON holds the rows as ``sweep``. Overrides go before ``--sweep``.

``--exported DIR`` (``tools/convert_checkpoint.py export --to moe``: config.json +
model.safetensors) runs trainer/hub.py's plain-PyTorch model in one process, with the image
size, normalisation and tokenizer of its config.json; it needs ``--eval-urls`` or ``--csv``
and reads up to ``data.max_regions`` (default 8 when the model has a CLOC prompter) regions
per image, ``data.eval_batch_size`` (default 128) samples per batch.

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
    if args.eval_urls or args.csv:  # the set given here replaces the run's eval sets
        raw.setdefault("eval", {})["sets"] = {}
    return config_from_saved(deep_merge(raw, parse_overrides(args.overrides))), manifest


def build_export_config(args: argparse.Namespace) -> tuple[Config, dict]:
    """(config, export config.json): model, tokenizer and preprocessing of the export <
    the command line. Raises ConfigError without an eval set."""
    from trainer.hub import read_config

    export = read_config(args.exported)
    if not (args.eval_urls or args.csv or any(o.startswith("eval.sets") for o in args.overrides)):
        raise ConfigError("--exported needs --eval-urls, --csv or eval.sets (an export carries "
                          "no eval set)")
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
    """evaluate_once() (the eval sets' report) or, with ``--sweep``, the sweep's rows
    (trainer/eval/sweep.py), each row's metrics flattened over the sets."""
    if not sweep:
        return evaluate_once()
    from trainer.eval.sets import flat_metrics
    from trainer.eval.sweep import run_sweep

    batch = cfg.data.eval_batch_size or cfg.data.batch_size
    rows = run_sweep(model, cfg.model, sweep, batch, evaluate_once, log.info)
    if rows[0]["metrics"] is None:  # not the reporting rank
        return None
    report = {k: v for k, v in rows[0]["metrics"].items() if k not in ("metrics", "sets")}
    return {**report, "sweep": [{**r, "metrics": flat_metrics(r["metrics"])} for r in rows]}


def evaluate_checkpoint(cfg: Config, sets: list, checkpoint: str, launch, layout,
                        sweep=None) -> dict | None:
    """Collective. Builds this rank's part of the model, loads the checkpoint (any saved
    layout) and evaluates each eval set; the report on the reporting rank, None elsewhere."""
    from trainer import checkpoint as ckpt
    from trainer.data import build_tokenizer
    from trainer.distributed import init_distributed
    from trainer.distributed.device import default_device
    from trainer.eval import evaluate
    from trainer.eval.sets import run_sets
    from trainer.models.build import build_model

    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    if launch.rank == 0:
        log.info("%s; layout %s", launch.describe(), layout.describe())
    model = build_model(cfg.model, layout, parallel=cfg.parallel, inference=True)
    model.to(default_device())
    ckpt.load_model(checkpoint, model, layout)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    report = _evaluate(model, cfg, sweep,
                       lambda: run_sets(sets, lambda c: evaluate(model, c, layout, tokenizer)))
    return report if reporter else None


def evaluate_export(cfg: Config, sets: list, directory: str, sweep=None) -> dict:
    """One process: trainer/hub.py's model of ``directory`` through ``embed_plain``, on each
    eval set."""
    import torch

    from trainer import hub
    from trainer.eval import compute_metrics
    from trainer.distributed.device import default_device
    from trainer.eval.embed import embed_plain, eval_batches
    from trainer.eval.sets import run_sets

    device = default_device()
    model = hub.load(directory, device=device)
    tokenizer = hub.load_tokenizer(directory)

    grounding = getattr(getattr(model, "prompter", None), "grounding", False)

    def one(cfg: Config) -> dict:
        tasks = tuple(cfg.eval.tasks)
        a = cfg.data.augment
        with torch.no_grad():
            emb = embed_plain(model, eval_batches(cfg, 0, 1, tokenizer), device,
                              text="retrieval" in tasks or "regions" in tasks,
                              regions="regions" in tasks and hasattr(model, "prompter"),
                              mean=a.mean, std=a.std,
                              ground="regions" in tasks and grounding)  # CLOC grounding acc.
            return compute_metrics(emb, cfg, model.encode_text, tokenizer, device, tasks)

    return _evaluate(model, cfg, sweep, lambda: run_sets(sets, one))


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
        from trainer.eval.embed import EvalSetError
        from trainer.eval.sets import check_eval_sets
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
        sets = check_eval_sets(cfg)
        if sweep:
            check_sweep(cfg, sweep)
    except (ConfigError, CheckpointError, EvalSetError, HubError, LaunchError,
            LayoutError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.exported:
            result = evaluate_export(cfg, sets, args.exported, sweep)
            where = "1 process (trainer/hub.py)"
        else:
            result = evaluate_checkpoint(cfg, sets, str(checkpoint), launch, layout, sweep)
            where = layout.describe()
    except EvalSetError as e:  # e.g. no class names for a labelled set
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_initialized() and not args.exported:  # the group this call started
            dist.destroy_process_group()
    if result is not None:
        from trainer.eval import format_metrics
        from trainer.eval.sweep import format_table

        report = {**source, **result, "world_size": launch.world_size, "layout": where,
                  "seconds": round(time.time() - t0, 1)}
        if sweep:  # the table on stdout, or on stderr when stdout carries the JSON
            print(format_table(result["sweep"]), file=sys.stdout if args.out else sys.stderr)
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
            if sweep:
                log.info("step %s: %d settings -> %s", source["step"], len(result["sweep"]),
                         args.out)
            for name, entry in ([("", result)] if "metrics" in result else []) + sorted(
                    result.get("sets", {}).items()):
                log.info("step %s: %s%s -> %s", source["step"], f"{name}: " if name else "",
                         format_metrics(entry["metrics"]), args.out)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
