"""The parallel layout: one object that owns the degrees and megatron-core's process groups.

``world = tp * pp * dp``; the vision tower is split over ``pp`` stages and the text tower sits
on the last stage; experts are split over ``ep`` ranks inside ``tp * dp`` (expert-TP is 1).
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        degrees = f"(world={self.world_size} tp={self.tp} pp={self.pp} ep={self.ep})"
        if min(self.world_size, self.tp, self.pp, self.ep) < 1:
            raise LayoutError(f"parallel degrees must be >= 1 {degrees}")
        if self.world_size % (self.tp * self.pp):
            raise LayoutError(f"parallel.tp * parallel.pp = {self.tp * self.pp} does not divide "
                              f"the world size {degrees}")
        if (self.tp * self.dp) % self.ep:
            raise LayoutError(f"parallel.ep={self.ep} does not divide tp * dp = "
                              f"{self.tp * self.dp} {degrees}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} ep={self.ep}"

    # ---- megatron-core process groups (the single source of truth)
    def initialize(self, seed: int = 0) -> "ParallelLayout":
        """Build megatron-core's groups for this layout and seed every generator: the same
        ``seed`` everywhere for replicated weights, megatron's per-TP-rank streams for dropout."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from trainer.distributed import cpu_compat

        cpu_compat.apply()
        if not dist.is_initialized():
            raise RuntimeError("init_distributed() must run before ParallelLayout.initialize()")
        if dist.get_world_size() != self.world_size:
            raise LayoutError(f"layout expects world={self.world_size}, "
                              f"torch.distributed has {dist.get_world_size()}")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            expert_model_parallel_size=self.ep, expert_tensor_parallel_size=1,
            create_gloo_process_groups=False)
        self.seed(seed)
        return self

    @staticmethod
    def seed(seed: int) -> None:
        import random

        import numpy as np
        import torch
        from megatron.core import tensor_parallel

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    @staticmethod
    def destroy() -> None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_rank()

    @property
    def ep_rank(self) -> int:
        from megatron.core import parallel_state as ps
        return ps.get_expert_model_parallel_rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def tp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()

    def pp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    def dp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group()

    def ep_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_expert_model_parallel_group()
