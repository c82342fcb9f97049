"""Run under torchrun (4 ranks, gloo): an upcycled-then-trained MoE CLIP through export and
reshard.

    torchrun --nproc_per_node=4 tests/distributed/check_export.py WORKDIR

A dense tiny CLIP is upcycled (E=4, top-2; vision every second block with capacity dispatch,
text every second block dropless) at TP=2 x EP=2 (DP=2), trains 3 AdamW steps and is saved
with its optimizer. Then, every rank taking part:
- the distributed model's embeddings on a fixed batch (eval mode; capacity 4x: no drops);
- ``convert_checkpoint.py export --to moe`` (in process, at TP=1 on the 4 ranks), and rank 0
  loads the export with trainer/hub.py (no megatron) and embeds the same batch;
- ``convert_checkpoint.py reshard --tp 1 --ep 1`` (DP=4); the resharded checkpoint and the
  original, both loaded at TP=1 x EP=1 with their optimizers: weights, AdamW moments, step
  counts, and one more training step's loss; the resharded model's embeddings vs the TP=2 x
  EP=2 model's; its manifest's layout, config and train_state.
Every rank writes ``result_rank{r}.json``; tests/distributed/test_export_dist.py states and
checks the tolerances.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers  # noqa: E402
from trainer import checkpoint, step as S  # noqa: E402
from trainer.models import build as B  # noqa: E402
from trainer.distributed import grads as G  # noqa: E402
from trainer import optim as O  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env  # noqa: E402
from trainer.models.state import full_state_dict, load_full_state_dict  # noqa: E402
from trainer.moe.upcycle import dense_config, upcycle_state_dict  # noqa: E402
from trainer.data.batches import synthetic_microbatches  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq")


def config(tp=1, ep=1):
    over = ["model.text.vocab_size=1000", f"parallel.tp={tp}", f"parallel.ep={ep}",
            "train.micro_batch_size=4", "train.lr=0.002", "train.lr_schedule=constant"]
    for tower, dispatch in (("vision", "capacity"), ("text", "dropless")):
        m = f"model.{tower}.moe."
        over += [m + "num_experts=4", m + "every=2", m + "top_k=2", m + f"dispatch={dispatch}",
                 m + "router_init_std=0.5", m + "capacity_factor=4.0",
                 m + "eval_capacity_factor=4.0", m + "aux.load_balance=0.01"]
    return load_config(None, over)


def snapshot(model, layout, grads=False):
    return {k: v.clone() for k, v in full_state_dict(model, layout, grads=grads).items()}


def moments(model, opt, layout):
    params, saved = list(model.parameters()), [p.grad for p in model.parameters()]
    out = {}
    for name in MOMENTS:
        for p in params:
            p.grad = opt.state[p][name] if p in opt.state else None
        out[name] = snapshot(model, layout, grads=True)
    for p, g in zip(params, saved):
        p.grad = g
    return out


def train_step(cfg, layout, ddp, opt, step):
    metrics = S.forward_backward(ddp, synthetic_microbatches(cfg, layout, step), cfg)
    G.finalize_grads(ddp, layout)
    G.clip_grads(ddp, layout, cfg.train.grad_clip)
    O.set_lr(opt, O.lr_at(step, cfg.train))
    opt.step()
    G.zero_grads(ddp, opt)
    return metrics["loss"] if metrics else None


def embed(model, images, text):
    model.eval()
    with torch.no_grad():
        out = (model.encode_image(images), model.encode_text(text))
    model.train()
    return out


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def max_dict_diff(a: dict, b: dict) -> tuple[float, list]:
    return (max(float((a[k] - b[k]).abs().max()) for k in a if k in b),
            sorted(set(a) ^ set(b)))


def upcycled(cfg, layout):
    """The MoE model of ``cfg`` upcycled from a dense model built (and seeded) at ``layout``."""
    dense_cfg = load_config(None, ["model.text.vocab_size=1000"])
    dense_cfg.parallel = cfg.parallel
    dense_cfg.model = dense_config(cfg.model)
    full = full_state_dict(B.build_for_training(dense_cfg, layout), layout)
    model = B.build_for_training(cfg, layout)
    load_full_state_dict(model, upcycle_state_dict(full, cfg.model, seed=0), layout)
    return model


def at_tp1(path, world):
    cfg = config()
    layout = ParallelLayout(world).initialize(seed=99)
    model = B.build_for_training(cfg, layout)
    opt = O.build_optimizer(model, cfg.train)
    manifest, _ = checkpoint.load_checkpoint(path, model, layout, optimizer=opt)
    return cfg, layout, model, opt, manifest


def main():
    from tools import convert_checkpoint

    workdir = Path(sys.argv[1])
    launch = read_launch_env()
    init_distributed(launch)
    world, rank = launch.world_size, launch.rank
    out = {}
    images, text = peers.sample_inputs(n=4, seed=7)

    # ---- upcycle, train 3 steps at TP=2 x EP=2, save, embed
    cfg = config(tp=2, ep=2)
    layout = ParallelLayout(world, 2, 1, 2).initialize(seed=0)
    model = upcycled(cfg, layout)
    ddp, opt = G.wrap_ddp(model), O.build_optimizer(model, cfg.train)
    for step in (1, 2, 3):
        out[f"loss_{step}"] = train_step(cfg, layout, ddp, opt, step)
    checkpoint.save_checkpoint(workdir / "ck", 3, model, config_to_dict(cfg), layout,
                               optimizer=opt, train_state={"step": 3, "consumed_samples": 24})
    ref = embed(model, images, text)
    w1 = full_state_dict(model, layout)["visual.transformer.layers.1.mlp.deepspeed_moe.experts.w1"]
    out["experts_diverged"] = float((w1[0] - w1[1]).abs().max())
    del model, ddp, opt

    # ---- export --to moe, load with the plain model
    convert_checkpoint.main(["export", "--to", "moe", "--ckpt", str(workdir / "ck"),
                             "--out", str(workdir / "moe")])
    if rank == 0:
        from trainer import hub
        plain = hub.load(workdir / "moe")
        with torch.no_grad():
            got = (plain.encode_image(images), plain.encode_text(text))
        out["hub_vs_tp2ep2"] = max_diff(got, ref)
        out["hub_is_plain"] = type(plain).__module__ == "trainer.hub"

    # ---- reshard TP=2 x EP=2 -> TP=1 x EP=1 (DP=4)
    convert_checkpoint.main(["reshard", "--ckpt", str(workdir / "ck"),
                             "--out", str(workdir / "ck_tp1"), "--tp", "1", "--ep", "1"])
    manifest = checkpoint.read_manifest(workdir / "ck_tp1")
    out["reshard_layout"] = manifest["layout"]
    out["reshard_parallel"] = manifest["config"]["parallel"]
    out["reshard_train_state"] = manifest["train_state"]
    out["reshard_step"] = manifest["step"]

    cfg, layout, a, opt_a, _ = at_tp1(workdir / "ck_tp1", world)
    out["reshard_vs_tp2ep2"] = max_diff(embed(a, images, text), ref)
    weights_a, moments_a = snapshot(a, layout), moments(a, opt_a, layout)
    out["reshard_steps"] = sorted({float(s["step"]) for s in opt_a.state.values()})
    out["reshard_loss_4"] = train_step(cfg, layout, G.wrap_ddp(a), opt_a, 4)
    del a, opt_a

    cfg, layout, b, opt_b, _ = at_tp1(workdir / "ck", world)
    out["weights"], out["weights_keys"] = max_dict_diff(weights_a, snapshot(b, layout))
    moments_b = moments(b, opt_b, layout)
    for m in MOMENTS:
        out[m], out[f"{m}_keys"] = max_dict_diff(moments_a[m], moments_b[m])
    out["direct_loss_4"] = train_step(cfg, layout, G.wrap_ddp(b), opt_b, 4)

    (workdir / f"result_rank{rank}.json").write_text(json.dumps(out, indent=1))
    ParallelLayout.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
