"""Run under torchrun (4 ranks, gloo): upcycled MoE CLIP across expert/tensor-parallel layouts.

    torchrun --nproc_per_node=4 tests/distributed/check_moe.py WORKDIR

One dense CLIP (saved as a checkpoint) is upcycled at each layout; every rank writes
``result_rank{r}.json`` with the measured differences (tests/distributed/test_moe.py states
and checks the tolerances):
- function preservation: MoE embeddings vs the dense model's, top-1 and top-2, EP=1/2/4 and
  TP=2 x EP=2;
- EP=2 / EP=4 / dropless / PP=2 x EP=2 vs EP=1: loss and every gradient (router aux losses
  on both pipeline stages) (the global batch split over DP
  ranks as microbatches, so each rank routes different tokens);
- DeepSpeed's expert groups are megatron's;
- a checkpoint saved at TP=2 x EP=2 reloads at TP=1 x EP=1 and EP=4 bit-exact;
- ``python -m trainer.upcycle`` (its main) writes an MoE checkpoint that, reloaded at
  another layout, still computes the dense model's embeddings;
- every expert of every MoE layer receives tokens in the function-preservation forwards;
- distinct experts (seeded per-expert noise, the same at every layout: gradref.py): every
  layout again vs EP=1, embeddings, loss and every gradient per expert, so a token sent to
  the wrong expert shows; EP=1 itself vs one process running the whole global batch;
- the global grad norm and the clipped gradients at EP=2 / EP=4 / dropless / TP=2 x EP=2 /
  PP=2 x EP=2 vs that single process (float64 norm of its full gradient);
- TP=2 x DP=2 (dense) with the global contrastive loss on vs one process computing the
  global batch (both DP ranks' micro-batches) as one contrastive batch;
- CLOC's region plan (trainer/step.py ``plan_regions``: one all-gather over the world) at
  DP=4 x EP=1 (no exchange without global contrastive), DP=4 x EP=2, EP=4, TP=2 x EP=2 and PP=2 x EP=2, global contrastive on and off, region
  masks different on every rank: equal to the per-micro-batch numbers it replaces (the max
  over the EP group of the mask's count, the sum over the loss's DP group).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peers  # noqa: E402
from gradref import (distinct_experts, grad_rel, norm64,  # noqa: E402
                     norm_and_clip, per_expert, reset_grads, solo_loss_and_grads)
from trainer import checkpoint, step as S  # noqa: E402
from trainer.models import build as B  # noqa: E402
from trainer.distributed import grads as G  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env  # noqa: E402
from trainer.models.state import full_state_dict  # noqa: E402
from trainer.moe.layer import moe_mlps  # noqa: E402
from trainer.upcycle import main as upcycle_cli, upcycle_model  # noqa: E402

SLICES = 4  # the global batch: 4 slices of 4 samples, spread over the DP ranks


def config(**kw):
    return load_config(None, overrides(**kw))


def overrides(tp=1, ep=1, pp=1, top_k=2, dispatch="capacity", aux=True, moe=True,
              global_contrastive=False):
    # each DP rank's microbatch is its own contrastive batch, like the EP=1 reference's slices
    over = ["model.text.vocab_size=1000", f"parallel.tp={tp}", f"parallel.ep={ep}",
            f"parallel.pp={pp}"]
    if not global_contrastive:
        over.append("train.global_contrastive=false")
    if moe:
        for tower, every in (("vision", 1), ("text", 2)):  # text mixes dense and MoE blocks
            m = f"model.{tower}.moe."
            over += [m + "num_experts=4", m + f"every={every}", m + "router_init=normal",
                     m + "router_init_std=0.5", m + f"top_k={top_k}", m + f"dispatch={dispatch}",
                     m + "capacity_factor=4.0", m + "eval_capacity_factor=4.0",
                     m + f"aux.load_balance={0.01 if aux else 0}",
                     m + f"aux.z_loss={0.001 if aux else 0}"]
    return over


def layout_for(cfg, world):
    return ParallelLayout(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep).initialize(
        seed=cfg.train.seed)


def max_abs(a, b):
    return float((a - b).abs().max())


def embeddings(model, images, text):
    model.eval()
    with torch.no_grad():
        out = model.encode_image(images), model.encode_text(text)
    model.train()
    return out


def loss_and_grads(cfg, layout, ddp, slices):
    mine = [s for i, s in enumerate(slices) if i % layout.dp == layout.dp_rank]
    out = S.forward_backward(ddp, mine, cfg)
    G.finalize_grads(ddp, layout)  # megatron DDP: DP / expert-DP reduce, routers over TP
    t = torch.tensor([out["loss"] if out is not None else 0.0])
    torch.distributed.all_reduce(t)  # the loss lives on the last stage's DP ranks
    # a copy: at pp=1 full_state_dict's tensors alias the grad buffers, reused below
    grads = {k: v.clone() for k, v in full_state_dict(G.unwrap(ddp), layout, grads=True).items()}
    return float(t) / (layout.dp * layout.tp), grads


def experts_reached(model):
    """Kept routes per expert of every MoE layer in the forwards since the last call, summed
    over all ranks: (smallest count, ["layer:expert" never reached])."""
    counts = [m.pop_stats()["tokens_per_expert"].float() for m in moe_mlps(model)]
    flat = torch.cat(counts)
    torch.distributed.all_reduce(flat)  # every rank routes its TP share of the same batch
    per_layer = flat.view(len(counts), -1)
    return float(per_layer.min()), [f"{i}:{e}" for i, e in (per_layer == 0).nonzero().tolist()]


def groups_match(model) -> bool:
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    import torch.distributed as dist
    ep, edp = ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group()
    name = f"ep_size_{dist.get_world_size(ep)}"
    ok = (groups._get_expert_parallel_group(name) is ep
          and groups._get_expert_data_parallel_group(name) is edp
          and groups._get_expert_parallel_group_ranks(name) == dist.get_process_group_ranks(ep)
          and groups._get_expert_data_parallel_group_ranks(name)
          == dist.get_process_group_ranks(edp))
    layers = [m for m in model.modules() if type(m).__name__ == "MoEMLP"]
    return ok and bool(layers) and all(m.deepspeed_moe.ep_group is ep for m in layers)


SOLO = ("ep1_top2", "ep1_noaux")  # references of the grad-norm checks


def distinct_case(name, cfg, layout, ddp, slices, ref_name, distinct, out):
    """The same case with distinct experts: embeddings, loss and per-expert gradients vs the
    reference layout's; the references also run as one process (``SOLO``), against which the
    global grad norm and the clipped gradients are checked."""
    model = G.unwrap(ddp)
    distinct_experts(model, layout)
    reset_grads(ddp)
    emb = embeddings(model, *slices_cat(slices)) if layout.pp == 1 else None
    solo = solo_loss_and_grads(ddp, slices, cfg) if name in SOLO else None
    loss, grads = loss_and_grads(cfg, layout, ddp, slices)
    distinct[name] = (loss, grads, emb, solo)
    if solo is not None:  # EP=1 over DP=4 vs one process
        out[f"{name}_solo_loss_diff"] = abs(loss - solo[0]) / abs(solo[0])
        out[f"{name}_solo_grad_rel"], out[f"{name}_solo_grad_keys"] = grad_rel(
            per_expert(grads), per_expert(solo[1]))
    if ref_name is None:
        return
    ref_loss, ref_grads, ref_emb, ref_solo = distinct[ref_name]
    out[f"{name}_distinct_loss_diff"] = abs(loss - ref_loss) / abs(ref_loss)
    out[f"{name}_distinct_grad_rel"], out[f"{name}_distinct_grad_keys"] = grad_rel(
        per_expert(grads), per_expert(ref_grads))
    if emb is not None:
        out[f"{name}_distinct_embed"] = max(max_abs(emb[0], ref_emb[0]),
                                            max_abs(emb[1], ref_emb[1]))
    if ref_solo is not None:
        out.update(norm_and_clip(ddp, layout, ref_solo[1], name))


def slices_cat(slices):
    return (torch.cat([s["images"] for s in slices]), torch.cat([s["text"] for s in slices]))


def global_contrastive_case(dense, dense_cfg, world, images, text, dense_ckpt, out):
    """TP=2 x DP=2, ``train.global_contrastive`` on (the default): each DP rank computes half
    of the global batch; loss and gradients equal one process's on the whole batch."""
    whole = [{"images": images, "text": text, "size": images.shape[0]}]
    solo_loss, solo_grads = solo_loss_and_grads(G.wrap_ddp(dense), whole, dense_cfg)
    cfg = load_config(None, overrides(tp=2, moe=False, global_contrastive=True))
    assert cfg.train.global_contrastive
    layout = layout_for(cfg, world)
    model = B.build_for_training(cfg, layout)
    checkpoint.load_model(dense_ckpt, model, layout)
    ddp = G.wrap_ddp(model)
    half = images.shape[0] // layout.dp
    mine = slice(layout.dp_rank * half, (layout.dp_rank + 1) * half)
    got = S.forward_backward(ddp, [{"images": images[mine], "text": text[mine],
                                    "size": half}], cfg)
    G.finalize_grads(ddp, layout)
    t = torch.tensor([got["loss"]])
    torch.distributed.all_reduce(t)  # this rank's rows: their mean over DP is the global loss
    loss = float(t) / (layout.dp * layout.tp)
    out["tp2_global_dp"] = layout.dp
    out["tp2_global_loss"] = loss
    out["tp2_global_local_loss"] = got["loss"]  # this rank's rows' share
    out["tp2_global_loss_diff"] = abs(loss - solo_loss) / abs(solo_loss)
    out["tp2_global_grad_rel"], out["tp2_global_grad_keys"] = grad_rel(
        full_state_dict(model, layout, grads=True), solo_grads)
    ref_norm = norm64(solo_grads)
    out["tp2_global_grad_norm_rel"] = abs(G.global_grad_norm(ddp, layout) - ref_norm) / ref_norm


def region_plan_layouts(world: int, out: dict) -> None:
    """``plan_regions`` vs ``max_over_expert_group(int(mask.sum()))`` and
    ``sum_over_group(mask.sum(), contrastive group)`` per micro-batch (no model)."""
    from trainer.distributed.collectives import max_over_expert_group
    from trainer.losses.gather import sum_over_group

    g = torch.Generator().manual_seed(7 + torch.distributed.get_rank())
    layouts = (("ep1", dict(ep=1)), ("ep2", dict(ep=2)), ("ep4", dict(ep=4)),
               ("tp2ep2", dict(tp=2, ep=2)), ("pp2ep2", dict(pp=2, ep=2)))
    for name, kw in layouts:
        for gc in (True, False):
            cfg = load_config(None, overrides(**kw, global_contrastive=gc) + [
                "model.prompter.layers=1", "train.region_loss_weight=1.0"])
            layout_for(cfg, world)
            mbs = [{"region_boxes": torch.zeros(2, 3, 4),
                    "region_mask": torch.rand(2, 3, generator=g) > 0.5} for _ in range(4)]
            S.plan_regions(mbs, cfg.train)
            group = S.contrastive_group(cfg.train)
            key = f"region_plan_{name}_gc{int(gc)}"
            out[key] = [[mb["region_rows"], mb["region_total"]] for mb in mbs]
            out[key + "_old"] = [[max_over_expert_group(int(mb["region_mask"].sum())),
                                  int(sum_over_group(mb["region_mask"].sum(), group))]
                                 for mb in mbs]
            out[key + "_local"] = [int(mb["region_mask"].sum()) for mb in mbs]


def main():
    workdir = Path(sys.argv[1])
    launch = read_launch_env()
    init_distributed(launch)
    world, rank = launch.world_size, launch.rank
    images, text = peers.sample_inputs(n=4 * SLICES, seed=3)
    slices = [{"images": images[i::SLICES], "text": text[i::SLICES], "size": 4}
              for i in range(SLICES)]
    out = {}

    # the dense source, saved once
    dense_cfg = config(moe=False)
    layout = layout_for(dense_cfg, world)
    dense = B.build_for_training(dense_cfg, layout)
    dense_img, dense_txt = embeddings(dense, images, text)
    checkpoint.save_checkpoint(workdir / "dense", 1, dense, config_to_dict(dense_cfg), layout)
    dense_ckpt = str(workdir / "dense")
    global_contrastive_case(dense, dense_cfg, world, images, text, dense_ckpt, out)

    refs, distinct = {}, {}
    cases = [("ep1_top2", dict(ep=1)), ("ep2_top2", dict(ep=2)), ("ep4_top2", dict(ep=4)),
             ("ep1_top1", dict(ep=1, top_k=1)), ("ep2_top1", dict(ep=2, top_k=1)),
             ("ep2_dropless", dict(ep=2, dispatch="dropless")),
             ("ep1_noaux", dict(ep=1, aux=False)), ("tp2ep2_top2", dict(tp=2, ep=2, aux=False)),
             ("ep1_top1_noaux", dict(ep=1, top_k=1, aux=False)),
             ("tp2ep2_top1", dict(tp=2, ep=2, top_k=1, aux=False))]
    # At TP > 1 each TP rank routes half of the tokens and computes the aux losses on its half,
    # so aux is off there. Without aux, top-2 router gradients at step 0 are rounding noise
    # (identical experts: the two weights sum to 1), so they are compared in absolute terms;
    # top-1's straight-through weight gives the router a real gradient, compared relatively.
    reference = {"ep2_top2": "ep1_top2", "ep4_top2": "ep1_top2", "ep2_top1": "ep1_top1",
                 "ep2_dropless": "ep1_top2", "tp2ep2_top2": "ep1_noaux",
                 "tp2ep2_top1": "ep1_top1_noaux"}
    cases.append(("pp2ep2_top2", dict(pp=2, ep=2)))  # aux losses on both stages
    reference["pp2ep2_top2"] = "ep1_top2"
    for name, kw in cases:
        cfg = config(**kw)
        layout = layout_for(cfg, world)
        model = upcycle_model(dense_ckpt, cfg, layout)
        if layout.pp == 1:
            for m in moe_mlps(model):
                m.pop_stats()
            img, txt = embeddings(model, images, text)
            out[f"{name}_preserve"] = max(max_abs(img, dense_img), max_abs(txt, dense_txt))
            out[f"{name}_reached_min"], out[f"{name}_unreached"] = experts_reached(model)
        out[f"{name}_groups"] = groups_match(model)
        ddp = G.wrap_ddp(model)
        loss, grads = loss_and_grads(cfg, layout, ddp, slices)
        refs[name] = (loss, grads)
        if name in reference:
            ref_loss, ref_grads = refs[reference[name]]
            out[f"{name}_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
            noise = (lambda k: False) if name != "tp2ep2_top2" else (lambda k: "gate.wg" in k)
            out[f"{name}_grad_rel"], out[f"{name}_grad_keys"] = grad_rel(
                {k: v for k, v in grads.items() if not noise(k)},
                {k: v for k, v in ref_grads.items() if not noise(k)})
            out[f"{name}_router_grad_abs"] = max(
                [max_abs(grads[k], ref_grads[k]) for k in ref_grads if noise(k)], default=0.0)
        if name == "tp2ep2_top2":
            saved_weights = full_state_dict(model, layout)
            checkpoint.save_checkpoint(workdir / "moe_tp2ep2", 1, model, config_to_dict(cfg),
                                       layout)
        distinct_case(name, cfg, layout, ddp, slices, reference.get(name), distinct, out)
        del model, ddp
    out["ref_loss"] = refs["ep1_top2"][0]
    out["distinct_loss_shift"] = abs(distinct["ep1_top2"][0] - refs["ep1_top2"][0]) / abs(
        refs["ep1_top2"][0])

    # reshard: TP=2 x EP=2 -> TP=1 x EP=1 and EP=4
    for name, kw in (("ckpt_to_ep1", dict(ep=1, aux=False)), ("ckpt_to_ep4", dict(ep=4, aux=False))):
        cfg = config(**kw)
        layout = layout_for(cfg, world)
        model = B.build_for_training(cfg, layout)
        checkpoint.load_model(workdir / "moe_tp2ep2", model, layout)
        weights = full_state_dict(model, layout)
        out[name] = max(max_abs(weights[k], v) for k, v in saved_weights.items())
        out[f"{name}_keys"] = sorted(set(weights) ^ set(saved_weights))

    # the upcycle CLI at TP=2 x EP=2, reloaded at EP=1: still the dense model's function
    out["cli_rc"] = upcycle_cli(["--dense", dense_ckpt, "--out", str(workdir / "cli_moe"),
                                 *overrides(tp=2, ep=2, aux=False)])
    cfg = config(ep=1, aux=False)
    layout = layout_for(cfg, world)
    model = B.build_for_training(cfg, layout)
    checkpoint.load_model(workdir / "cli_moe", model, layout)
    img, txt = embeddings(model, images, text)
    out["cli_upcycle_preserve"] = max(max_abs(img, dense_img), max_abs(txt, dense_txt))
    out["cli_upcycle_reached_min"], out["cli_upcycle_unreached"] = experts_reached(model)
    region_plan_layouts(world, out)
    (workdir / f"result_rank{rank}.json").write_text(json.dumps(out, indent=1))
    ParallelLayout.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
