"""This rank's experts: stacked FFN weights run by the ``kernels/`` grouped expert MLP.

Replaces DeepSpeed's ``Experts`` (a Python loop over per-expert modules). Weights are stacked
per local expert in the kernels' layout: ``w1 [E_local, d, f]``, ``b1 [E_local, f]``,
``w2 [E_local, f, d]``, ``b2 [E_local, d]``. Expert e of this rank is global expert
``ep_rank * E_local + e``. Every parameter carries ``allreduce = False`` (DeepSpeed's and
megatron DDP's mark for "sync over expert-data-parallel only") and ``expert_parallel = True``.
"""
from __future__ import annotations

import torch

import kernels


class GroupedExperts(torch.nn.Module):
    def __init__(self, num_local: int, hidden: int, ffn: int, activation: str,
                 init_std: float = 0.02, dtype: torch.dtype = torch.float32,
                 group_name: str = ""):
        super().__init__()
        self.num_local, self.activation = num_local, activation
        self.w1 = torch.nn.Parameter(torch.empty(num_local, hidden, ffn, dtype=dtype))
        self.b1 = torch.nn.Parameter(torch.zeros(num_local, ffn, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.empty(num_local, ffn, hidden, dtype=dtype))
        self.b2 = torch.nn.Parameter(torch.zeros(num_local, hidden, dtype=dtype))
        with torch.no_grad():
            self.w1.normal_(0.0, init_std)
            self.w2.normal_(0.0, init_std)
        for p in self.parameters():
            p.allreduce = False
            p.expert_parallel = True
            p.group_name = group_name

    def forward(self, x: torch.Tensor, counts: torch.Tensor, stride: int | None = None
                ) -> torch.Tensor:
        """x [T, d] holding row groups g = src * E_local + e (``counts [G]``), consecutive
        (``stride=None``) or at ``g * stride`` with zero padding after each group's rows (the
        capacity layout, padding skipped). -> [T, d], zeros outside the groups."""
        return kernels.expert_mlp(x, self.w1, self.b1, self.w2, self.b2, counts, stride=stride,
                                  activation=self.activation)
