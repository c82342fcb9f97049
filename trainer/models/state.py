"""Full (unsharded) state dicts of a TP/PP-sharded CLIP, in our canonical names.

The canonical names are the model's own ``state_dict()`` keys at tp=1, pp=1: vision block
``i`` is ``visual.transformer.layers.{i}`` whatever stage holds it. Megatron's parallel linear
layers tag their weights with ``tensor_model_parallel`` / ``partition_dim``; shards are
concatenated along that dim in TP-rank order (the fused QKV layout is per head, so whole
heads land on each rank and concatenation restores the tp=1 layout). MoE expert weights
(``expert_parallel``) are concatenated along the expert dim in EP-rank order.

These are for conversion, export and tests (gathers to every rank, on CPU). Training
checkpoints go through megatron-core dist_checkpointing instead (trainer/checkpoint.py).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from trainer.distributed.grads import grad_of
from trainer.distributed.layout import ParallelLayout

_LAYER = re.compile(r"^(visual\.transformer\.layers\.)(\d+)\.(.*)$")


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """local parameter name -> canonical (global) name."""
    numbers = {}
    for i, layer in enumerate(model.visual.transformer.layers):
        numbers[i] = layer.layer_number - 1
    out = {}
    for name, _ in model.named_parameters():
        m = _LAYER.match(name)
        out[name] = f"{m.group(1)}{numbers[int(m.group(2))]}.{m.group(3)}" if m else name
    return out


def _is_tp_sharded(p: torch.Tensor, layout: ParallelLayout) -> bool:
    return layout.tp > 1 and getattr(p, "tensor_model_parallel", False)


def _is_ep_sharded(p: torch.Tensor, layout: ParallelLayout) -> bool:
    """MoE expert weights: this rank holds experts [ep_rank * E_local, ...) along dim 0."""
    return layout.ep > 1 and getattr(p, "expert_parallel", False)


def full_state_dict(model: torch.nn.Module, layout: ParallelLayout,
                    grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its ``.grad``) unsharded, on every rank, as CPU tensors."""
    names = canonical_names(model)
    local = {}
    for name, p in model.named_parameters():
        t = grad_of(p) if grads else p.data
        if t is None:
            t = torch.zeros_like(p.data)
        t = t.detach()
        if _is_tp_sharded(p, layout):
            parts = [torch.empty_like(t) for _ in range(layout.tp)]
            dist.all_gather(parts, t.contiguous(), group=layout.tp_group())
            t = torch.cat(parts, dim=p.partition_dim)
        elif _is_ep_sharded(p, layout):
            parts = [torch.empty_like(t) for _ in range(layout.ep)]
            dist.all_gather(parts, t.contiguous(), group=layout.ep_group())
            t = torch.cat(parts)
        local[names[name]] = t.cpu()
    if layout.pp == 1:
        return local
    stages: list = [None] * layout.pp
    dist.all_gather_object(stages, local, group=layout.pp_group())
    full = {}
    for stage in stages:
        full.update(stage)
    return full


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor],
                         layout: ParallelLayout) -> None:
    """Copy this rank's shard of every parameter out of ``full`` (canonical names)."""
    names = canonical_names(model)
    missing = [names[n] for n, _ in model.named_parameters() if names[n] not in full]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[names[name]]
            if _is_tp_sharded(p, layout):
                src = src.chunk(layout.tp, dim=p.partition_dim)[layout.tp_rank]
            elif _is_ep_sharded(p, layout):
                src = src.chunk(layout.ep)[layout.ep_rank]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{names[name]}: checkpoint shape {tuple(src.shape)} != "
                                 f"model shape {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))
