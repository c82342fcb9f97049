"""DeepSpeed-MoE over megatron-core's expert groups (megatron is the single source of truth).

DeepSpeed looks its groups up by name (``ep_size_{ep}``) in ``deepspeed.utils.groups``; left to
itself it builds them from consecutive ranks and ignores TP, which disagrees with megatron at
TP=2 x EP=2. ``use_megatron_groups()`` registers megatron's EP and expert-DP groups under that
name before any MoE layer is built, and initialises ``deepspeed.comm`` over the existing
torch.distributed world (DeepSpeed's all-to-all goes through it).
"""
from __future__ import annotations

import torch.distributed as dist


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def use_megatron_groups() -> str:
    """Idempotent; collective-free. Returns the DeepSpeed group name."""
    from trainer.distributed import cpu_compat

    cpu_compat.select_deepspeed_accelerator()  # before DeepSpeed is imported
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    cpu_compat.patch_deepspeed()
    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   verbose=False)
    ep_group = ps.get_expert_model_parallel_group()
    edp_group = ps.get_expert_data_parallel_group()
    name = group_name(dist.get_world_size(ep_group))
    if groups._EXPERT_PARALLEL_GROUP.get(name) is not ep_group:
        groups._EXPERT_PARALLEL_GROUP[name] = ep_group
        groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
        groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)
    return name
