"""Single-process references and comparisons shared by the torchrun check scripts.

- ``solo_loss_and_grads``: one rank runs the whole global batch through the model with no
  collective at all (megatron DDP only accumulates into ``main_grad`` until
  ``finish_grad_sync``, which is not called), and broadcasts the loss and its gradients
  (canonical names) to every rank;
- ``norm_and_clip``: the layout's global grad norm (``trainer.step.global_grad_norm``) and
  its clipped gradients (``clip_grads`` with max_norm = half the true norm, so clipping is
  active) against the reference's float64 norm and its gradients scaled by max_norm / norm;
- ``distinct_experts``: seeded per-expert noise on the canonical full state dict, keyed by
  parameter name and global expert index, so every layout gets the same distinct experts;
- ``grad_rel`` over ``per_expert`` slices: one relative error per expert.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from trainer import step as S
from trainer.distributed import grads as G
from trainer.models.state import canonical_names, full_state_dict, load_full_state_dict

EXPERT = ".deepspeed_moe.experts."
NOISE_STD = 0.01  # the dense weights are ~N(0, 0.02): the experts differ by ~50%


def reset_grads(ddp) -> None:
    ddp.zero_grad_buffer()
    for p in G.unwrap(ddp).parameters():
        p.grad = None  # finalize_grads aliased .grad to main_grad: would be added twice


def solo_loss_and_grads(ddp, microbatches: list[dict], cfg, src: int = 0):
    """(loss, {canonical name: grad}) of the whole global batch on rank ``src`` alone; the
    model must have no collective in its forward (TP = PP = EP = 1, no global contrastive)."""
    box = [None]
    if dist.get_rank() == src:
        reset_grads(ddp)
        out = S.forward_backward(ddp, microbatches, cfg)
        model = G.unwrap(ddp)
        names = canonical_names(model)
        box = [(out["loss"], {names[n]: p.main_grad.detach().clone().cpu()
                              for n, p in model.named_parameters() if p.requires_grad})]
    dist.broadcast_object_list(box, src=src)
    reset_grads(ddp)
    return box[0]


def norm64(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def per_expert(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors [E, ...] -> one entry per global expert."""
    out = {}
    for k, g in grads.items():
        if EXPERT in k:
            out.update({f"{k}[{e}]": g[e] for e in range(g.shape[0])})
        else:
            out[k] = g
    return out


def grad_rel(grads, ref):
    """Worst per-tensor relative L2 error, and the keys present on one side only."""
    worst, missing = 0.0, sorted(set(ref) ^ set(grads))
    for k, g in ref.items():
        if k in grads:
            worst = max(worst, float((grads[k] - g).norm() / g.norm().clamp_min(1e-12)))
    return worst, missing


def distinct_experts(model, layout) -> None:
    """Adds N(0, NOISE_STD) noise, seeded by (canonical name, global expert index), to every
    expert: the same experts at every layout."""
    full = full_state_dict(model, layout)
    for k, v in full.items():
        if EXPERT in k:
            v = full[k] = v.clone()
            for e in range(v.shape[0]):
                gen = torch.Generator().manual_seed(zlib.crc32(f"{k}[{e}]".encode()))
                v[e] += NOISE_STD * torch.randn(v.shape[1:], generator=gen, dtype=v.dtype)
    load_full_state_dict(model, full, layout)


def norm_and_clip(ddp, layout, ref_grads, prefix: str) -> dict:
    """After ``finalize_grads``: the layout's global norm, and its gradients clipped to half
    the reference norm, against the single-process reference (clips the model's grads)."""
    ref_norm = norm64(ref_grads)
    norm = G.global_grad_norm(ddp, layout)
    max_norm = 0.5 * ref_norm
    returned = G.clip_grads(ddp, layout, max_norm)
    clipped = full_state_dict(G.unwrap(ddp), layout, grads=True)
    scale = max_norm / ref_norm
    rel, keys = grad_rel(per_expert(clipped), per_expert({k: g * scale
                                                         for k, g in ref_grads.items()}))
    return {f"{prefix}_ref_norm": ref_norm, f"{prefix}_norm": norm,
            f"{prefix}_norm_rel": abs(norm - ref_norm) / ref_norm,
            f"{prefix}_clip_returned_rel": abs(returned - ref_norm) / ref_norm,
            f"{prefix}_clipped_norm_rel": abs(norm64(clipped) - max_norm) / max_norm,
            f"{prefix}_clip_rel": rel, f"{prefix}_clip_keys": keys}
