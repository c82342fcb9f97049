"""Sparse upcycling of checkpoints (CLIP-UP): a dense CLIP checkpoint -> an MoE CLIP, by config.

    torchrun --nproc_per_node=2 -m trainer.upcycle --dense CKPT --out DIR \\
        --config configs/X.yaml model.vision.moe.num_experts=4 model.vision.moe.every=2 ...

works on our training checkpoints and on imported open_clip / HF / OpenAI weights
(``tools/convert_checkpoint.py import`` writes the same format). Training can also upcycle at
start: ``checkpoint.upcycle_from=CKPT``. The state-dict transformation itself (exact expert
copies, router init) is trainer/moe/upcycle.py.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch

from trainer import checkpoint
from trainer.config import Config, ConfigError, config_from_saved, config_to_dict, load_config
from trainer.config_cli import parse_config_args
from trainer.distributed import init_distributed, read_launch_env
from trainer.distributed.layout import ParallelLayout
from trainer.models.build import build_for_training
from trainer.models.state import full_state_dict, load_full_state_dict
from trainer.moe.names import TOWERS
from trainer.moe.upcycle import (UpcycleError, check_same_architecture, dense_config,
                                 upcycle_state_dict)

log = logging.getLogger("upclip")


def upcycle_model(dense_ckpt: str, cfg: Config, layout: ParallelLayout) -> torch.nn.Module:
    """Collective. Builds the MoE model of ``cfg`` at ``layout`` from a dense checkpoint."""
    manifest = checkpoint.read_manifest(dense_ckpt)
    saved = config_from_saved(manifest["config"]).model
    check_same_architecture(saved, cfg.model, str(checkpoint.resolve(dense_ckpt)))
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.model = dense_config(cfg.model)
    dense = build_for_training(dense_cfg, layout)
    checkpoint.load_model(dense_ckpt, dense, layout)
    full = full_state_dict(dense, layout)
    del dense
    moe_full = upcycle_state_dict(full, cfg.model, seed=cfg.train.seed)
    model = build_for_training(cfg, layout)
    load_full_state_dict(model, moe_full, layout)
    for prefix, name in TOWERS:
        tower = getattr(cfg.model, name)
        if tower.moe.enabled:
            log.info("upcycled %s blocks %s: %d experts, top-%d, %s dispatch", name,
                     tower.moe.moe_layers(tower.layers), tower.moe.num_experts, tower.moe.top_k,
                     tower.moe.dispatch)
    return model


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m trainer.upcycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="dense checkpoint (directory or root)")
    p.add_argument("--out", required=True, help="checkpoint root for the MoE model")
    p.add_argument("--config", help="YAML config with the moe settings")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parse_config_args(p, sys.argv[1:] if argv is None else argv, Config)

    try:
        cfg = load_config(args.config, args.overrides)
        if not (cfg.model.vision.moe.enabled or cfg.model.text.moe.enabled):
            raise ConfigError("no tower has model.*.moe.num_experts > 0: nothing to upcycle")
        launch = read_launch_env()
        layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp,
                                cfg.parallel.ep)
        manifest = checkpoint.read_manifest(args.dense)
    except (ConfigError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    try:
        model = upcycle_model(args.dense, cfg, layout)
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checkpoint.save_checkpoint(args.out, manifest["step"], model, config_to_dict(cfg), layout,
                               extra={"upcycled_from": str(checkpoint.resolve(args.dense))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
