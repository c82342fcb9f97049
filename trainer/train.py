"""Train UpCLIP: ``python -m trainer.train --config configs/X.yaml key.sub=value ...``.

Runs as one process, under torchrun, srun or mpirun (see trainer/distributed/launch.py).
Bad configs and layouts fail before any heavy import, with one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from trainer.config import Config, ConfigError, config_to_dict, load_config
from trainer.distributed.launch import LaunchError, read_launch_env
from trainer.distributed.layout import LayoutError, ParallelLayout

log = logging.getLogger("upclip")


def synthetic_microbatches(cfg: Config, layout: ParallelLayout, step: int) -> list[dict]:
    """Random images and captions, fixed per (step mod 4, microbatch, dp rank) so a tiny model
    can fit them; identical on every TP/PP rank of a data-parallel replica."""
    import torch

    m, t = cfg.model, cfg.train
    out = []
    for mb in range(t.num_microbatches):
        g = torch.Generator().manual_seed(
            hash((t.seed, step % 4, mb, layout.dp_rank)) % (2 ** 31))
        b = t.micro_batch_size
        images = torch.randn(b, 3, m.vision.image_size, m.vision.image_size, generator=g)
        text = torch.randint(1, m.text.eot_id, (b, m.text.context_length), generator=g)
        ends = torch.randint(1, m.text.context_length, (b,), generator=g)
        text[torch.arange(b), ends] = m.text.eot_id
        text = torch.where(torch.arange(m.text.context_length) > ends[:, None], 0, text)
        out.append({"images": images, "text": text, "size": b})
    return out


def moe_summary(model) -> str:
    """' moe: dropped X% load_balance Y' over this rank's MoE layers since the last call."""
    from trainer.moe.layer import MoEMLP

    wanted = kept = lb = calls = 0.0
    for m in model.modules():
        if isinstance(m, MoEMLP):
            st = m.pop_stats()
            if st:
                wanted += float(st["routes_wanted"])
                kept += float(st["routes_kept"])
                lb += float(st["aux_load_balance"])
                calls += float(st["calls"])
    if not calls:
        return ""
    return f" moe: dropped {100 * (1 - kept / max(wanted, 1)):.1f}% load_balance {lb / calls:.3f}"


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
    return cfg, launch, layout


def run(cfg: Config, launch, layout: ParallelLayout) -> dict:
    import torch

    from trainer import checkpoint, step as S
    from trainer.distributed import init_distributed

    t0 = time.time()
    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    rank0 = launch.rank == 0
    reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    if rank0:
        log.info("%s; layout %s", launch.describe(), layout.describe())
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    if cfg.checkpoint.upcycle_from:
        from trainer.moe.upcycle import upcycle_model
        model = upcycle_model(cfg.checkpoint.upcycle_from, cfg, layout)
    else:
        model = S.build_model(cfg, layout)
    if rank0:
        n = sum(p.numel() for p in model.parameters())
        log.info("built CLIP stage %d/%d: %.2fM params on this rank", layout.pp_rank + 1,
                 layout.pp, n / 1e6)
    if cfg.checkpoint.load:
        checkpoint.load_model(cfg.checkpoint.load, model, layout)
    optimizer = S.build_optimizer(model, cfg)
    history = []
    for step in range(1, cfg.train.steps + 1):
        ts = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss = S.forward_backward(model, synthetic_microbatches(cfg, layout, step), cfg)
        S.allreduce_grads(model, layout)
        norm = S.clip_grads(model, layout, cfg.train.grad_clip)
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            if layout.is_last_stage:
                model.logit_scale.clamp_(0, 4.6052)
        if layout.is_last_stage and layout.dp > 1:
            t = torch.tensor([loss])
            torch.distributed.all_reduce(t, group=layout.dp_group())
            loss = float(t) / layout.dp
        if reporter:
            history.append(loss)
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                log.info("step %d/%d loss %.4f grad_norm %.3f %.2fs%s", step, cfg.train.steps,
                         loss, norm, time.time() - ts, moe_summary(model))
    if cfg.checkpoint.save_dir:
        checkpoint.save_checkpoint(cfg.checkpoint.save_dir, cfg.train.steps, model,
                                   config_to_dict(cfg), layout)
    if reporter:
        log.info("done: %d steps in %.1fs", cfg.train.steps, time.time() - t0)
    return {"losses": history}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg, launch, layout = prepare(argv if argv is not None else sys.argv[1:])
    except (ConfigError, LaunchError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(cfg, launch, layout)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
