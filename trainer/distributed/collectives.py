"""Small collectives over the default process group, no-ops in a plain single process.

Used by checkpointing, export and the tools: whole Python objects, not tensors (the training
step's tensor collectives live in trainer/distributed/grads.py and the loss gather), and the
small integer plans of a training step (``all_gather_ints``: trainer/step.py's region plan).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("upclip")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (of ``group``, default all), in rank order within the group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any(errors: list, error_type: type[Exception] = RuntimeError) -> None:
    """``errors``: one entry per rank (falsy: no problem). Every rank raises the same error
    when one rank found a problem, so none hangs in a later collective."""
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        where, msg = bad[0]
        more = f" (and {len(bad) - 1} more ranks)" if len(bad) > 1 else ""
        raise error_type(f"rank {where}: {msg}{more}")


def on_rank0(fn, *args, error_type: type[Exception] = RuntimeError, **kwargs):
    """Collective: ``fn`` runs on rank 0; its result, or its error (re-raised as
    ``error_type`` with the same message), reaches every rank."""
    if world() == 1:
        return fn(*args, **kwargs)
    result = error = None
    if rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or they hang
            log.debug("rank 0 failed", exc_info=True)
            error = str(e).strip("'\"") or type(e).__name__
    result, error = all_gather_object((result, error))[0]
    if error:
        raise error_type(error)
    return result


def _collective_device() -> torch.device:
    """Where a small tensor for a collective of the default backend must live: the current
    CUDA device under NCCL (it takes no CPU tensors), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_expert_group(n: int) -> int:
    """The largest ``n`` of this rank's expert-parallel group (megatron's): sizes that the
    MoE all-to-alls need equal on every member. ``n`` itself outside EP > 1."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_expert_model_parallel_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_expert_model_parallel_group())
    return int(t)


def group_ranks(group) -> list[int]:
    """The global ranks of ``group`` in group order; ``[rank()]`` for None (this rank alone)."""
    if group is None or not dist.is_initialized():
        return [rank()]
    return dist.get_process_group_ranks(group)


def expert_group_ranks() -> list[int]:
    """The global ranks of this rank's expert-parallel group (megatron's); ``[rank()]``
    before megatron's groups exist."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return [rank()]
    return group_ranks(ps.get_expert_model_parallel_group())


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), indexed by global rank: ONE
    all-gather of a small int64 tensor over the world and one host read of the result (on the
    current CUDA device under NCCL, which takes no CPU tensors). ``[values]`` in a plain
    single process."""
    if world() == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.long, device=_collective_device())  # [m]
    parts = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(parts, mine)
    return torch.stack(parts).tolist()                                          # [world][m]
