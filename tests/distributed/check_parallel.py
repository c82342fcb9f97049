"""Run under torchrun (2 ranks, gloo): the same weights and batch through several layouts.

    torchrun --nproc_per_node=2 tests/distributed/check_parallel.py WORKDIR

WORKDIR holds ``refs.pt`` (peer embeddings and inputs) and the imported checkpoints
``ckpt_open_clip`` / ``ckpt_hf``. Every rank writes ``result_rank{r}.json`` with the measured
differences; tests/distributed/test_parallel.py states and checks the tolerances.

Besides the TP=2 / PP=2 vs TP=1 comparisons: one process computes the batch alone (no
collective, gradref.py); the TP=1 reference equals it, and at TP=2 and PP=2 the global grad
norm (``trainer.step.global_grad_norm``) and the gradients clipped to half of it equal that
process's float64 norm and scaled gradients. ``train.contrastive_scope=step`` with 4
micro-batches equals one micro-batch of 4x the size at DP=2 and at PP=2.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gradref import grad_rel as grad_rel_keys, norm_and_clip, solo_loss_and_grads  # noqa: E402
from trainer import checkpoint, step as S  # noqa: E402
from trainer.models import build as B  # noqa: E402
from trainer.distributed import grads as G  # noqa: E402
from trainer.config import config_from_saved  # noqa: E402
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env  # noqa: E402
from trainer.models.state import full_state_dict  # noqa: E402


def build(workdir: Path, ckpt: str, tp: int, pp: int, world: int):
    cfg = config_from_saved(checkpoint.read_manifest(workdir / ckpt)["config"])
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.train.global_contrastive = False  # DP replicas here compute the same batch
    layout = ParallelLayout(world, tp, pp).initialize(seed=123)
    model = B.build_for_training(cfg, layout)
    checkpoint.load_model(workdir / ckpt, model, layout)
    return cfg, layout, model


def microbatches(refs):
    images, text = refs["images"], refs["text"]
    half = images.shape[0] // 2
    return [{"images": images[i:i + half], "text": text[i:i + half], "size": half}
            for i in (0, half)]


def loss_and_grads(cfg, layout, ddp, refs):
    out = S.forward_backward(ddp, microbatches(refs), cfg)
    G.finalize_grads(ddp, layout)
    loss = out["loss"] if out is not None else None
    # a copy: at pp=1 these alias the grad buffers, which clipping scales later
    grads = {k: v.clone() for k, v in full_state_dict(G.unwrap(ddp), layout, grads=True).items()}
    if layout.pp > 1:  # the loss lives on the last stage
        box = [loss]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_world_size() - 1)
        loss = box[0]
    return loss, grads


def max_abs(a, b):
    return float((a - b).abs().max())


def grad_rel(grads, ref):
    worst = 0.0
    for k, g in ref.items():
        worst = max(worst, float((grads[k] - g).norm() / g.norm().clamp_min(1e-12)))
    return worst


def embeddings(model, refs):
    with torch.no_grad():
        return model.encode_image(refs["images"]), model.encode_text(refs["text"])


def sdpa_vs_unfused_tp2(workdir: Path, world: int, refs) -> dict:
    """model.attention=sdpa vs =unfused at tp=2 on the same weights: both towers' embeddings
    (max abs), the loss and every gradient (relative)."""
    got = {}
    for attention in ("unfused", "sdpa"):
        cfg = config_from_saved(checkpoint.read_manifest(workdir / "ckpt_open_clip")["config"])
        cfg.parallel.tp, cfg.parallel.pp, cfg.model.attention = 2, 1, attention
        cfg.train.global_contrastive = False
        layout = ParallelLayout(world, 2, 1).initialize(seed=123)
        model = B.build_for_training(cfg, layout)
        checkpoint.load_model(workdir / "ckpt_open_clip", model, layout)
        got[attention] = (*embeddings(model, refs),
                          *loss_and_grads(cfg, layout, G.wrap_ddp(model), refs))
    (ui, ut, ul, ug), (si, st, sl, sg) = got["unfused"], got["sdpa"]
    return {"tp2_sdpa_vs_unfused_embed": max(max_abs(si, ui), max_abs(st, ut)),
            "tp2_sdpa_vs_unfused_loss_rel": abs(sl - ul) / abs(ul),
            "tp2_sdpa_vs_unfused_grad_rel": grad_rel(sg, ug)}


def scope_rel(grads, ref) -> tuple[float, float]:
    """(worst per-tensor relative L2 error, floored at 1e-8 of the whole gradient's norm for
    exactly-zero true gradients; the whole gradient's relative L2 error)."""
    total = sum(float(g.double().pow(2).sum()) for g in ref.values()) ** 0.5
    diff = {k: float((grads[k].double() - g.double()).norm()) for k, g in ref.items()}
    worst = max(d / max(float(ref[k].double().norm()), 1e-8 * total) for k, d in diff.items())
    return worst, sum(d * d for d in diff.values()) ** 0.5 / total


def contrastive_scope_step(workdir: Path, world: int, refs) -> dict:
    """``train.contrastive_scope=step`` with 4 micro-batches of 2 vs ``microbatch`` scope with
    one micro-batch of 8: at DP=2 (global negatives, a different order of the 8 samples on
    each rank) in float64 weights and inputs and in fp32, and at PP=2 in fp32."""
    got = {}
    for pp, dtype in ((1, torch.float64), (1, torch.float32), (2, torch.float32)):
        runs = {}
        for scope, n in (("microbatch", 1), ("step", 4)):
            cfg, layout, model = build(workdir, "ckpt_open_clip", 1, pp, world)
            cfg.train.global_contrastive, cfg.train.contrastive_scope = True, scope
            model.to(dtype)
            order = torch.arange(8)
            if pp == 1 and layout.dp_rank == 1:
                order = order.flip(0)
            images, text = refs["images"][order].to(dtype), refs["text"][order]
            size = 8 // n
            mbs = [{"images": images[i:i + size], "text": text[i:i + size], "size": size}
                   for i in range(0, 8, size)]
            ddp = G.wrap_ddp(model)
            out = S.forward_backward(ddp, mbs, cfg)
            G.finalize_grads(ddp, layout)
            grads = {k: v.clone() for k, v in
                     full_state_dict(G.unwrap(ddp), layout, grads=True).items()}
            box = [out["loss"] if out is not None else None]
            torch.distributed.broadcast_object_list(box, src=world - 1)
            runs[scope] = (box[0], grads)
        (loss, grads), (ref_loss, ref_grads) = runs["step"], runs["microbatch"]
        name = f"{'pp2' if pp == 2 else 'dp2'}_{'f64' if dtype == torch.float64 else 'fp32'}"
        got[f"scope_{name}_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
        got[f"scope_{name}_grad_rel"], got[f"scope_{name}_grad_global_rel"] = scope_rel(
            grads, ref_grads)
        got[f"scope_{name}_keys_missing"] = sorted(set(ref_grads) ^ set(grads))
    return got


def main():
    workdir = Path(sys.argv[1])
    launch = read_launch_env()
    init_distributed(launch)
    world, rank = launch.world_size, launch.rank
    refs = torch.load(workdir / "refs.pt")
    out = {}

    # tp=1 pp=1 (two data-parallel replicas computing the same batch): the reference
    cfg, layout, model = build(workdir, "ckpt_open_clip", 1, 1, world)
    img, txt = embeddings(model, refs)
    out["tp1_open_clip_embed"] = max(max_abs(img, refs["oc_image"]), max_abs(txt, refs["oc_text"]))
    ddp = G.wrap_ddp(model)
    solo_loss, solo_grads = solo_loss_and_grads(ddp, microbatches(refs), cfg)
    ref_loss, ref_grads = loss_and_grads(cfg, layout, ddp, refs)
    out["tp1_solo_loss_rel"] = abs(ref_loss - solo_loss) / abs(solo_loss)
    out["tp1_solo_grad_rel"], out["tp1_solo_grad_keys"] = grad_rel_keys(ref_grads, solo_grads)
    ref_weights = full_state_dict(model, layout)

    # tp=2: peer embeddings, loss and grads; save a checkpoint at this layout
    cfg, layout, model = build(workdir, "ckpt_open_clip", 2, 1, world)
    img, txt = embeddings(model, refs)
    out["tp2_open_clip_embed"] = max(max_abs(img, refs["oc_image"]), max_abs(txt, refs["oc_text"]))
    ddp = G.wrap_ddp(model)
    loss, grads = loss_and_grads(cfg, layout, ddp, refs)
    out["tp2_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
    out["tp2_grad_rel"] = grad_rel(grads, ref_grads)
    out.update(norm_and_clip(ddp, layout, solo_grads, "tp2"))
    checkpoint.save_checkpoint(workdir / "ckpt_tp2", 7, model, checkpoint.read_manifest(
        workdir / "ckpt_open_clip")["config"], layout)
    cfg, layout, model = build(workdir, "ckpt_hf", 2, 1, world)
    img, txt = embeddings(model, refs)
    out["tp2_hf_embed"] = max(max_abs(img, refs["hf_image"]), max_abs(txt, refs["hf_text"]))

    # pp=2: loss and grads through the 1F1B schedule; reload the tp=2 checkpoint at pp=2
    cfg, layout, model = build(workdir, "ckpt_open_clip", 1, 2, world)
    ddp = G.wrap_ddp(model)
    loss, grads = loss_and_grads(cfg, layout, ddp, refs)
    out["pp2_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
    out["pp2_grad_rel"] = grad_rel(grads, ref_grads)
    out.update(norm_and_clip(ddp, layout, solo_grads, "pp2"))
    out["pp2_grad_keys_missing"] = sorted(set(ref_grads) - set(grads))
    cfg, layout, model = build(workdir, "ckpt_tp2", 1, 2, world)
    weights = full_state_dict(model, layout)
    out["tp2_to_pp2_ckpt_max_abs"] = max(max_abs(weights[k], v) for k, v in ref_weights.items())
    out["ref_loss"] = ref_loss
    out.update(sdpa_vs_unfused_tp2(workdir, world, refs))
    out.update(contrastive_scope_step(workdir, world, refs))
    (workdir / f"result_rank{rank}.json").write_text(json.dumps(out, indent=1))
    ParallelLayout.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
