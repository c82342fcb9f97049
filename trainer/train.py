"""Train UpCLIP: ``python -m trainer.train --config configs/X.yaml key.sub=value ...``
(installed: ``upclip-train --config X key.sub=value``).

The command line only: the loop is trainer/trainer.py. Runs as one process, under torchrun,
srun or mpirun (see trainer/distributed/launch.py). Bad configs and layouts fail before any
heavy import (torch included), with one line naming the problem (local shards of
data.train_urls / data.eval_urls that do not exist too); what can only be found once the run
has started (a ``checkpoint.save_dir`` holding no usable checkpoint, data that gives no batch)
ends it the same way. ``--print-config`` prints the resolved
config with every key's type, default and doc. Exit codes: trainer/signals.py ``EXIT_CODES``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.config import Config, ConfigError, load_config
from trainer.config_cli import named_configs, parse_config_args
from trainer.config_docs import key_table, render_yaml
from trainer.data.urls import check_local_shards
from trainer.distributed.launch import LaunchError, read_launch_env
from trainer.distributed.logs import setup_logging
from trainer.distributed.layout import LayoutError, ParallelLayout
from trainer.models.presets import MODEL_PRESETS
from trainer.signals import EXIT_BAD_INPUT, EXIT_CODES, StopSignals, write_exit_status

log = logging.getLogger("upclip")


def _preset_line(name: str, p: dict) -> str:
    v, t = p["vision"], p["text"]
    return (f"  {name:<9} ViT {v['width']}x{v['layers']} patch {v['patch_size']} at "
            f"{v['image_size']} px, text {t['width']}x{t['layers']} ({t['context_length']} "
            f"tokens), embed {p['embed_dim']}")


def epilog() -> str:
    sections = [f"  {k:<11} {i.doc}" for k, i in key_table(Config).items() if "." not in k]
    return "\n".join([
        "config: defaults < --config YAML < overrides. Overrides: key.sub=value, "
        "--key.sub=value or --key.sub value",
        "(a bool key alone means true). --print-config lists every key with its type, default "
        "and doc.", "", "sections:", *sections, "",
        "model presets (model.preset; keys given beside it override it):",
        *[_preset_line(n, p) for n, p in MODEL_PRESETS.items()], "",
        f"shipped configs (--config NAME): {', '.join(named_configs())}", "",
        "exit codes:", *[f"  {code}  {what}" for code, what in EXIT_CODES.items()]])


def parse_args(argv: list[str]) -> argparse.Namespace:
    prog = Path(sys.argv[0]).name if Path(sys.argv[0]).name.startswith("upclip") else \
        "python -m trainer.train"
    p = argparse.ArgumentParser(prog=prog, description="Train (or upcycle) a CLIP model.",
                                epilog=epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE|NAME",
                   help="YAML file, or the name of a shipped config (e.g. smoke, b16_upcycle)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as commented YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides, applied after the YAML")
    return parse_config_args(p, argv, Config)


def prepare(cfg: Config) -> tuple["object", ParallelLayout]:
    """Everything else that can fail on bad input, before torch.distributed or megatron."""
    cfg.train.wandb.check_installed("train.wandb")
    launch = read_launch_env()
    layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    for key in ("train_urls", "eval_urls"):  # a typo'd shard path: one line, not an empty epoch
        if getattr(cfg.data, key):
            try:
                check_local_shards(getattr(cfg.data, key), f"data.{key}")
            except (OSError, ValueError) as e:  # also: a missing list file, ${NAME} unset
                raise ConfigError(str(e)) from None
    return launch, layout


def run(cfg: Config, launch, layout: ParallelLayout, signals=None) -> dict:
    """One training run (trainer/trainer.py): {"losses", "evals", "exit_code", "step"}."""
    from trainer.trainer import Trainer
    return Trainer(cfg, launch, layout, signals).train()


def main(argv: list[str] | None = None) -> int:
    # Handlers first: a SLURM stop signal that arrives while megatron is still importing is
    # acted on at the first step instead of killing the process.
    signals = StopSignals()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(render_yaml(cfg, f"UpCLIP config ({' '.join(argv) or 'defaults'}); each key: "
                                   "[type, default] doc. Usable as --config."), end="")
            return 0
        launch, layout = prepare(cfg)
    except (ConfigError, LaunchError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup_logging(launch.rank)  # INFO from rank 0; known-benign dependency messages filtered
    from trainer.trainer import BAD_INPUT_ERRORS, bad_input_exit
    try:
        result = run(cfg, launch, layout, signals)
    except BAD_INPUT_ERRORS as e:  # found after the start: no usable checkpoint, no data
        return bad_input_exit(e, cfg.run_dir, launch.rank)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    if launch.rank == 0:
        write_exit_status(cfg.run_dir, result["exit_code"], result["step"])
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
