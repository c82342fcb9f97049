"""Train UpCLIP: ``python -m trainer.train --config configs/X.yaml key.sub=value ...``.

The command line only: the loop is trainer/trainer.py. Runs as one process, under torchrun,
srun or mpirun (see trainer/distributed/launch.py). Bad configs and layouts fail before any
heavy import, with one line naming the problem (local shards of data.train_urls /
data.eval_urls that do not exist too); what can only be found once the run has started (a
``checkpoint.save_dir`` holding no usable checkpoint, data that gives no batch) ends it the
same way. Exit codes: 0 done, 2 bad input,
3 (``EXIT_REQUEUE``) stopped by SIGUSR1/SIGTERM after saving, 4 too many non-finite steps in a
row.
"""
from __future__ import annotations

import argparse
import logging
import sys

from trainer.config import Config, ConfigError, load_config
from trainer.data.urls import check_local_shards
from trainer.distributed.launch import LaunchError, read_launch_env
from trainer.distributed.layout import LayoutError, ParallelLayout

log = logging.getLogger("upclip")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.train",
                                description="Train (or upcycle) a CLIP model.")
    p.add_argument("--config", help="YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (after the YAML)")
    return p.parse_args(argv)


def prepare(argv) -> tuple[Config, "object", ParallelLayout]:
    """Everything that can fail on bad input, before torch.distributed or megatron."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    launch = read_launch_env()
    layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    for key in ("train_urls", "eval_urls"):  # a typo'd shard path: one line, not an empty epoch
        if getattr(cfg.data, key):
            try:
                check_local_shards(getattr(cfg.data, key), f"data.{key}")
            except (OSError, ValueError) as e:  # also: a missing list file, ${NAME} unset
                raise ConfigError(str(e)) from None
    return cfg, launch, layout


def run(cfg: Config, launch, layout: ParallelLayout, signals=None) -> dict:
    """One training run (trainer/trainer.py): {"losses", "evals", "exit_code", "step"}."""
    from trainer.trainer import Trainer
    return Trainer(cfg, launch, layout, signals).train()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every param at INFO
    from trainer.signals import StopSignals, write_exit_status

    # Handlers first: a SLURM stop signal that arrives while megatron is still importing is
    # acted on at the first step instead of killing the process.
    signals = StopSignals()
    try:
        cfg, launch, layout = prepare(argv if argv is not None else sys.argv[1:])
    except (ConfigError, LaunchError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
