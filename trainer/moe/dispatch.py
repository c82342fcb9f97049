"""Moving tokens to experts and back: every collective of the MoE layer lives here.

- ``CapacityDispatch``: DeepSpeed's ``MOELayer`` (capacity buffers ``[E, C, M]``, its
  all-to-all over the EP group), with the valid-row counts sent alongside so that the grouped
  GEMM skips the zero padding of each ``C`` block.
- ``dropless_dispatch``: tokens sorted by expert, ``all_to_all_single`` with split sizes,
  ragged groups straight into the grouped GEMM; nothing is dropped or padded.
- ``scatter_to_tp`` / ``gather_from_tp``: at TP > 1 the layer input is replicated over the TP
  ranks; each TP rank routes a 1/tp slice of the units and the outputs are all-gathered, so no
  expert work is repeated (the same split megatron uses under sequence parallelism).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.distributed import cpu_compat

cpu_compat.select_deepspeed_accelerator()  # before DeepSpeed is imported
from deepspeed.moe.sharded_moe import (MOELayer, _AllToAll, _route_slots,  # noqa: E402
                                       _sparse_decode, _sparse_encode)

from trainer.moe.routing import Routing, expert_counts, group_routes  # noqa: E402


def busiest_expert(chosen: torch.Tensor, valid: torch.Tensor, num_experts: int, group,
                   ep: int) -> int:
    """DeepSpeed's no-drop capacity: the largest expert load over the EP group."""
    wanted = torch.where(valid[:, None], chosen, -1)
    top = expert_counts(wanted, num_experts).max().reshape(1)
    if ep > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return max(int(top), 1)


def exchange_counts(counts: torch.Tensor, group, ep: int) -> torch.Tensor:
    """counts [E] (by destination rank, then local expert) -> [ep, E_local] received: row s is
    what rank s sends to this rank's experts."""
    if ep == 1:
        return counts.view(1, -1)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out.view(ep, -1)


class CapacityDispatch(MOELayer):
    """DeepSpeed's MoE layer with our gate decisions and our grouped experts."""

    def __init__(self, gate: torch.nn.Module, experts: torch.nn.Module, ep_size: int,
                 num_local: int):
        super().__init__(gate, experts, f"ep_size_{ep_size}", ep_size, num_local)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:  # type: ignore[override]
        """x [T, M] tokens, routing over those tokens -> [T, M] (weighted sum of experts)."""
        t, m = x.shape
        e, c = self.ep_size * self.num_local_experts, routing.capacity
        indices = routing.experts.t().contiguous()                  # [k, T]
        slots = _route_slots(indices, routing.slots.t(), e, c)     # flat slot per route
        buf = _sparse_encode(x, slots, e, c)                        # [E, C, M]
        counts = exchange_counts(expert_counts(routing.experts, e), self.ep_group, self.ep_size)
        if self.ep_size > 1:
            buf = _AllToAll.apply(self.ep_group, buf)               # [ep, E_local, C, M]
        y = self.experts(buf.view(-1, m), counts.reshape(-1), stride=c)
        if self.ep_size > 1:
            y = _AllToAll.apply(self.ep_group, y.view(e, c, m))      # back to [E, C, M]
        return _sparse_decode(y.view(e * c, m), slots, routing.weights.t(), t)


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.splits = group, (in_splits, out_splits)
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        return _AllToAllV.apply(grad, ctx.group, in_splits, out_splits), None, None, None


def dropless_dispatch(x: torch.Tensor, routing: Routing, experts: torch.nn.Module,
                      group, ep: int) -> torch.Tensor:
    """x [T, M] -> [T, M]; every route computed, groups ragged (one host sync for the split
    sizes, as any all_to_all_v needs)."""
    t, m = x.shape
    num_local = experts.num_local
    routes, tokens, counts = group_routes(routing.experts, ep * num_local)  # by expert
    xs = x.index_select(0, tokens)                                  # [R, M]
    if ep == 1:
        ys = experts(xs, counts)
    else:
        recv = exchange_counts(counts, group, ep)                   # [ep, E_local]
        send_splits = counts.view(ep, num_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        xr = _AllToAllV.apply(xs, group, recv_splits, send_splits)  # groups (src, e_local)
        ys = _AllToAllV.apply(experts(xr, recv.reshape(-1)), group, send_splits, recv_splits)
    w = routing.weights.reshape(-1).index_select(0, routes).to(ys.dtype)
    return x.new_zeros(t, m).index_add(0, tokens, ys * w[:, None])


# ---- tensor-parallel split of the routing units ----------------------------------------------

class _ScatterToTP(torch.autograd.Function):
    """Forward: this TP rank's slice of dim 0. Backward: all-gather (the input is replicated,
    so every TP rank needs the full gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        return x.chunk(n)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the slices. Backward: this rank's slice (downstream of the layer
    every TP rank computes the same replicated gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        return grad.chunk(n)[dist.get_rank(ctx.group)].contiguous(), None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)  # list form: gloo has no _base variant
    return torch.cat(parts)


def scatter_to_tp(x: torch.Tensor, group, tp: int) -> torch.Tensor:
    return x if tp == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, tp: int) -> torch.Tensor:
    return x if tp == 1 else _GatherFromTP.apply(x, group)
