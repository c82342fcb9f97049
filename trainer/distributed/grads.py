"""Gradients across the parallel layout: megatron-core DDP, the routers' TP sum, the true
global norm and clipping.

    ddp = wrap_ddp(model)                     # grads land in ddp's buffers (param.main_grad)
    ...backward...
    finalize_grads(ddp, layout)               # DP / expert-DP reduce, routers over TP
    norm = clip_grads(ddp, layout, max_norm)  # global norm: every parameter counted once
    optimizer.step(); zero_grads(ddp, optimizer)
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trainer.distributed.layout import ParallelLayout


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """megatron-core DDP: dense grads averaged over DP, expert grads (``allreduce=False``)
    summed over expert-DP and divided by DP, in fp32 buffers (``param.main_grad``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def grad_of(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer steps with: ``p.grad`` when set (``finalize_grads`` points an
    fp32 parameter's at its reduced ``main_grad``), else DDP's fp32 ``main_grad`` (a bf16
    parameter's gradient stays there), else None."""
    if p.grad is not None:
        return p.grad
    return getattr(p, "main_grad", None)


def finalize_grads(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """After backward: reduce the DDP buffers, then sum the routers over TP, and point every
    fp32 ``param.grad`` at its reduced ``main_grad`` for the optimizer (a bf16 parameter's
    fp32 gradient stays in ``main_grad``: trainer/optim.py ``MasterWeightAdamW`` reads it).

    Routers at TP > 1 saw only their TP rank's share of the routing units and are marked
    ``sequence_parallel``; megatron sums those over TP only when the whole tower runs
    sequence-parallel, which ours does not, so the sum is done here.
    """
    model.finish_grad_sync()
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if layout.tp > 1:
        flat_allreduce([p.main_grad for p in params if getattr(p, "sequence_parallel", False)],
                       layout.tp_group())
    for p in params:
        if p.main_grad.dtype == p.dtype:
            p.grad = p.main_grad


def zero_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)


def flat_allreduce(grads: list[torch.Tensor], group) -> None:
    """Sum ``grads`` over ``group`` in one coalesced all-reduce."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum_g ||g||^2 in float64 on ``device``: one fused norm per dtype, no host read."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        norms = torch._foreach_norm(same, 2.0)
        total = total + torch.stack(norms).double().pow(2).sum()
    return total


def global_grad_norm(model: torch.nn.Module, layout: ParallelLayout) -> float:
    """L2 norm of the full model's gradient: TP shards summed, TP replicas counted once,
    experts summed over their EP group, pipeline stages summed. One reduction per process
    group and one host read, whatever the number of parameters."""
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    device = next(model.parameters()).device
    dense, experts = [], []
    for p in model.parameters():
        g = grad_of(p)
        if g is None:
            continue
        if not getattr(p, "allreduce", True):
            experts.append(g)
        elif getattr(p, "tensor_model_parallel", False) or layout.tp_rank == 0:
            dense.append(g)
    sq_experts = _sum_of_squares(experts, device)
    if layout.ep > 1:
        dist.all_reduce(sq_experts, group=layout.ep_group())
    # every TP rank of a stage now holds all of that stage's experts: count them once
    sq = _sum_of_squares(dense, device) + sq_experts / layout.tp
    if layout.tp * layout.pp > 1:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return math.sqrt(float(sq))


def clip_grads(model: torch.nn.Module, layout: ParallelLayout, max_norm: float) -> float:
    """Scales the grads to ``max_norm`` when above it (0: no clipping); returns the norm
    before clipping (nan/inf when a gradient is not finite: nothing is scaled then)."""
    norm = global_grad_norm(model, layout)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        grads = [g for g in map(grad_of, unwrap(model).parameters()) if g is not None]
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm
