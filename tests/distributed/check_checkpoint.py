"""Run under torchrun (4 ranks, gloo): full training state through a checkpoint.

    torchrun --nproc_per_node=4 tests/distributed/check_checkpoint.py WORKDIR

A tiny MoE CLIP (E=4, top-2, every second block of both towers) trains 2 AdamW steps at
TP=2 x EP=2 (DP=2) and is saved with its optimizer, train_state and per-rank state (RNG and a
data position). Every rank writes ``result_rank{r}.json`` with what it measured
(tests/distributed/test_checkpoint_dist.py states and checks the tolerances):
- resume at the same layout into a fresh model and optimizer, RNG restored from rank_state:
  step 3's loss and the weights after it vs the run that went on without reloading (step 3's
  images carry noise drawn from the torch generator, so the RNG restore is load-bearing);
- reload at TP=1 x EP=1 (DP=4), TP=1 x EP=4 (DP=4) and PP=2 x EP=2: the gathered weights and
  AdamW moments (exp_avg, exp_avg_sq per canonical name) vs the saved ones, every step count
  2, rank_state None;
- rng round trip: the draws after ``set_rng_state`` equal those after ``rng_state``.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer import checkpoint, step as S  # noqa: E402
from trainer.models import build as B  # noqa: E402
from trainer.distributed import grads as G  # noqa: E402
from trainer import optim as O  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env  # noqa: E402
from trainer.distributed.rng import rng_state, set_rng_state  # noqa: E402
from trainer.models.state import full_state_dict  # noqa: E402
from trainer.data.batches import synthetic_microbatches  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq")


def config(tp=1, ep=1, pp=1):
    over = ["model.text.vocab_size=1000", f"parallel.tp={tp}", f"parallel.ep={ep}",
            f"parallel.pp={pp}", "train.micro_batch_size=4", "train.lr=0.001",
            "train.lr_schedule=constant", "train.lr_mult_experts=0.5"]
    for tower in ("vision", "text"):
        m = f"model.{tower}.moe."
        over += [m + "num_experts=4", m + "every=2", m + "router_init=normal",
                 m + "router_init_std=0.5", m + "top_k=2", m + "capacity_factor=4.0",
                 m + "eval_capacity_factor=4.0", m + "aux.load_balance=0.01",
                 m + "aux.z_loss=0.001"]
    return load_config(None, over)


def setup(cfg, world, seed=0):
    layout = ParallelLayout(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    layout.initialize(seed=seed)  # the init seed; the data keep cfg.train.seed
    model = B.build_for_training(cfg, layout)
    return layout, model, G.wrap_ddp(model), O.build_optimizer(model, cfg.train)


def train_step(cfg, layout, ddp, opt, step, noise=False):
    batches = synthetic_microbatches(cfg, layout, step)
    if noise:  # drawn from this rank's torch generator, made equal over the TP group
        for b in batches:
            n = torch.randn(b["images"].shape)
            torch.distributed.all_reduce(n, group=layout.tp_group())
            b["images"] = b["images"] + 0.1 * n / layout.tp
    metrics = S.forward_backward(ddp, batches, cfg)
    G.finalize_grads(ddp, layout)
    G.clip_grads(ddp, layout, cfg.train.grad_clip)
    O.set_lr(opt, O.lr_at(step, cfg.train))
    opt.step()
    G.zero_grads(ddp, opt)
    return metrics["loss"] if metrics else None


def snapshot(model, layout, grads=False):
    """full_state_dict, copied: on CPU its unsharded entries alias the live tensors."""
    return {k: v.clone() for k, v in full_state_dict(model, layout, grads=grads).items()}


def full_moments(model, opt, layout):
    """{moment: {canonical name: full tensor}} via full_state_dict's gradient gather."""
    out = {}
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    for name in MOMENTS:
        for p in params:
            p.grad = opt.state[p][name] if p in opt.state else None
        out[name] = snapshot(model, layout, grads=True)
    for p, g in zip(params, saved_grads):
        p.grad = g
    return out


def step_counts(opt) -> list[float]:
    return sorted({float(s["step"]) for s in opt.state.values()})


def max_diff(a: dict, b: dict) -> tuple[float, list]:
    keys = sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b), keys


def draws():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(4).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(4).tolist(), tracked]


def main():
    workdir = Path(sys.argv[1])
    launch = read_launch_env()
    init_distributed(launch)
    world, rank = launch.world_size, launch.rank
    out = {}

    cfg = config(tp=2, ep=2)
    layout, model, ddp, opt = setup(cfg, world)
    out["groups"] = [g["name"] for g in opt.param_groups]
    for step in (1, 2):
        train_step(cfg, layout, ddp, opt, step)

    # (c) rng round trip, through JSON
    captured = json.loads(json.dumps(rng_state()))
    first = draws()
    set_rng_state(captured)
    out["rng_roundtrip"] = draws() == first
    set_rng_state(captured)

    rank_state = {"rng": rng_state(), "data": {"epoch": 0, "sample": 8 * (rank + 1)}}
    train_state = {"step": 2, "consumed_samples": 2 * 4 * layout.dp}
    saved_weights = snapshot(model, layout)
    saved_moments = full_moments(model, opt, layout)
    saved_steps = step_counts(opt)
    checkpoint.save_checkpoint(workdir / "ck", 2, model, config_to_dict(cfg), layout,
                               optimizer=opt, train_state=train_state, rank_state=rank_state)
    # the run that goes on without reloading
    loss_a = train_step(cfg, layout, ddp, opt, 3, noise=True)
    weights_a = snapshot(model, layout)
    del model, ddp, opt

    # (a) resume at the same layout into fresh objects (another init seed)
    layout, model, ddp, opt = setup(cfg, world, seed=1234)
    manifest, got = checkpoint.load_checkpoint(workdir / "ck", model, layout, optimizer=opt)
    out["train_state_ok"] = manifest["train_state"] == train_state
    out["rank_state_ok"] = got == json.loads(json.dumps(rank_state))
    out["resume_steps"] = step_counts(opt)
    set_rng_state(got["rng"])
    loss_b = train_step(cfg, layout, ddp, opt, manifest["train_state"]["step"] + 1, noise=True)
    out["resume_loss_a"], out["resume_loss_b"] = loss_a, loss_b
    out["resume_weights"], out["resume_keys"] = max_diff(snapshot(model, layout),
                                                         weights_a)
    del model, ddp, opt

    # (b) other layouts: weights and moments as saved; no per-rank state
    for name, kw in (("ep1", dict(tp=1, ep=1)), ("ep4", dict(tp=1, ep=4)),
                     ("pp2ep2", dict(pp=2, ep=2))):
        cfg = config(**kw)
        layout, model, ddp, opt = setup(cfg, world)
        _, got = checkpoint.load_checkpoint(workdir / "ck", model, layout, optimizer=opt)
        out[f"{name}_rank_state"] = got
        out[f"{name}_steps"] = step_counts(opt)
        out[f"{name}_weights"], out[f"{name}_weights_keys"] = max_diff(
            snapshot(model, layout), saved_weights)
        moments = full_moments(model, opt, layout)
        for m in MOMENTS:
            out[f"{name}_{m}"], out[f"{name}_{m}_keys"] = max_diff(moments[m], saved_moments[m])
        del model, ddp, opt
    out["saved_steps"] = saved_steps
    out["num_params"] = len(saved_weights)
    out["nonzero_moments"] = all(float(t.abs().max()) > 0 for t in saved_moments["exp_avg_sq"]
                                 .values())
    (workdir / f"result_rank{rank}.json").write_text(json.dumps(out, indent=1))
    ParallelLayout.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
