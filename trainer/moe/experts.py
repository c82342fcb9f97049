"""This rank's experts: stacked FFN weights run by the ``kernels/`` grouped expert MLP.

Replaces DeepSpeed's ``Experts`` (a Python loop over per-expert modules). Weights are stacked
per local expert in the kernels' layout: ``w1 [E_local, d, f]``, ``b1 [E_local, f]``,
``w2 [E_local, f, d]``, ``b2 [E_local, d]``. Expert e of this rank is global expert
``ep_rank * E_local + e``. Every parameter carries ``allreduce = False`` (DeepSpeed's and
megatron DDP's mark for "sync over expert-data-parallel only") and ``expert_parallel = True``.

``backend`` (``model.<tower>.moe.expert_backend``) is the kernels backend: auto | cuda | torch |
reference (kernels/api.py). The backend that served the first call is logged once at INFO
(``log_name`` set: the layer's name; empty: not logged, e.g. on all but one rank).
"""
from __future__ import annotations

import logging

import torch

import kernels

log = logging.getLogger("upclip")


class GroupedExperts(torch.nn.Module):
    def __init__(self, num_local: int, hidden: int, ffn: int, activation: str,
                 init_std: float = 0.02, dtype: torch.dtype = torch.float32,
                 group_name: str = "", backend: str = "auto", log_name: str = ""):
        super().__init__()
        self.num_local, self.activation, self.backend = num_local, activation, backend
        self.log_name, self.served_first = log_name, None  # the first call's backend
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
        first = self.served_first is None
        before = kernels.BACKEND_CALLS.copy() if first else None
        y = kernels.expert_mlp(x, self.w1, self.b1, self.w2, self.b2, counts, stride=stride,
                               activation=self.activation, backend=self.backend)
        if first:
            (_, self.served_first), = (kernels.BACKEND_CALLS - before).keys()
            if self.log_name:
                log.info("MoE %s: experts (%d local, %s) served by the %s backend "
                         "(expert_backend=%s)", self.log_name, self.num_local,
                         str(x.dtype).removeprefix("torch."), self.served_first, self.backend)
        return y
