"""The one collective of the contrastive losses: an all-gather whose backward is a reduce-scatter.

Gradient convention (open_clip's ``gather_features(gather_with_grad=True, local_loss=True)``):
rank ``r`` of ``W`` computes a local loss ``L_r`` from its own rows and the gathered tensor, and
the data-parallel sync (megatron-core DDP) then AVERAGES parameter gradients over the ranks.
The objective is the mean ``L = (1/W) sum_r L_r``, whose gradient w.r.t. rank ``s``'s slice is
``(1/W) sum_r dL_r/dx_s``. The averaging supplies the ``1/W``, so the backward of the gather
must hand rank ``s`` the SUM over ranks ``r`` of ``dL_r/d(gathered)[slice s]``: a reduce-scatter
with SUM, not a mean, and not just the local rank's own slice of its gradient (the latter
drops every other rank's loss terms that use ``x_s`` as a negative).
Equivalently: after backward, rank ``s`` holds ``W x dL/dx_s``; averaging the parameter
gradients over ranks then gives exactly ``dL/dtheta`` of the single-process global-batch loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """1 when ``group`` is None (no data parallelism), else the group's world size."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


_MAX_DIMS = 8


def _check_equal_shapes(x: torch.Tensor, group) -> None:
    """Raise on every rank if the ranks' shapes differ: one tiny all-gather of the shape, run
    only for CPU tensors (gloo), where it costs no device sync. On CUDA the caller guarantees
    equal shapes (the data pipeline yields fixed-shape microbatches)."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather_with_grad supports up to {_MAX_DIMS} dims, got {x.shape}")
    shape = torch.full((1 + _MAX_DIMS,), -1, dtype=torch.int64)  # [ndim, d0, d1, ..., -1]
    shape[0] = x.dim()
    shape[1:1 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(group_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        found = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(f"all_gather_with_grad needs equal shapes on every rank; got {found} "
                         f"(in the group's rank order)")


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    world = group_size(group)
    x = x.contiguous()
    if x.is_cuda:  # NCCL: one flat buffer
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]  # gloo: the list form works everywhere
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def _reduce_scatter_sum(grad: torch.Tensor, group) -> torch.Tensor:
    world, rank = group_size(group), group_rank(group)
    grad = grad.contiguous()
    n = grad.shape[0] // world
    if grad.is_cuda:  # NCCL
        out = grad.new_empty((n, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
        return out
    # older gloo has no reduce_scatter: all-reduce the whole tensor, keep our slice
    total = grad.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total[rank * n:(rank + 1) * n]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_sum(grad, ctx.group), None


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x [b, ...]`` on every rank -> ``[world*b, ...]`` in group rank order, outside autograd
    (any dtype: e.g. the region captions' token ids). Same shape rule as
    ``all_gather_with_grad``; ``group=None`` or a group of one: identity."""
    if group_size(group) == 1:
        return x
    if not x.is_cuda:
        _check_equal_shapes(x, group)
    return _gather(x.detach(), group)


def sum_over_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``, without gradient (e.g. a count of valid
    rows that normalises a loss); ``group=None``: ``x`` itself."""
    if group_size(group) == 1:
        return x.detach()
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def count_tensor(count: int, like: torch.Tensor) -> torch.Tensor:
    """A count of valid rows known on the host (at least 1) as a 0-dim tensor of ``like``'s
    dtype and device, equal to ``mask.sum().clamp(min=1).to(dtype)``: a fill, not a copy from
    the host, so no device sync."""
    return torch.full((), max(int(count), 1), dtype=like.dtype, device=like.device)


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x [b, ...]`` on every rank of ``group`` -> ``[world*b, ...]``, rank ``r``'s rows at
    ``r*b:(r+1)*b`` (ranks in group order). Backward: rank ``s`` receives the SUM over ranks of
    the gradient w.r.t. rows ``s*b:(s+1)*b`` (see the module docstring for why that is right
    when data-parallel gradients are averaged). ``group=None`` or a group of one: identity, no
    collective. Every rank must pass the same shape (checked on CPU; a ValueError on every
    rank otherwise) and every rank must run the backward (it is a collective)."""
    if group_size(group) == 1:
        return x
    if not x.is_cuda:
        _check_equal_shapes(x, group)
    return _AllGatherWithGrad.apply(x, group)

