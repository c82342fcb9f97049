"""The router: DeepSpeed's ``TopKGate`` (its ``wg`` projection, noise policies and capacity
settings) under the routing rules of trainer/moe/routing.py (pure torch, shared with the plain
model of trainer/hub.py).

``Router.forced_expert = e`` (see ``trainer.moe.layer.force_expert``) sends every valid unit to
expert e alone with weight 1 and no capacity limit (``routing.forced``).
"""
from __future__ import annotations

import torch

from trainer.distributed import cpu_compat

cpu_compat.select_deepspeed_accelerator()  # before DeepSpeed is imported
from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402

from trainer.moe.config import MoEConfig  # noqa: E402
from trainer.moe.routing import capacity_for, choose, forced, route, router_logits  # noqa: E402

_DS_NOISE = {"none": None, "jitter": "Jitter", "rsample": "RSample"}


class Router(TopKGate):
    """DeepSpeed's gate module (``wg``: Linear(d, E, bias=False)) under our routing rules."""

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg.num_experts, k=cfg.top_k,
                         capacity_factor=cfg.capacity_factor,
                         eval_capacity_factor=cfg.eval_capacity_factor,
                         min_capacity=cfg.min_capacity, noisy_gate_policy=_DS_NOISE[cfg.noisy_gate],
                         drop_tokens=cfg.drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
        self.cfg = cfg
        self.forced_expert: int | None = None
        with torch.no_grad():
            if cfg.router_init == "zeros":
                self.wg.weight.zero_()
            else:
                self.wg.weight.normal_(0.0, cfg.router_init_std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[U, d] -> fp32 [U, E]."""
        return router_logits(x, self.wg.weight, self.cfg.noisy_gate, self.training)

    def capacity(self, units: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity_for(units, self.cfg.num_experts, factor, self.k, self.min_capacity,
                            self.cfg.capacity_rule)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, capacity_fn=None):
        """x [U, d], valid [U] bool. ``capacity_fn(chosen [U, k], valid) -> int | None``
        decides the capacity after the choice (dropless: None; no-drop: the busiest expert
        over the EP group); by default the factor rule ``cfg.capacity_rule``. DeepSpeed's
        ``TopKGate.forward`` (and its own ``_capacity``) never runs: its capacity settings
        above are stored only, the capacity of every call comes from ``capacity``. -> (Routing, logits, probs,
        chosen)."""
        logits = self.logits(x)
        chosen, probs = choose(logits, self.k, self.cfg.noisy_gate, self.training)
        if self.forced_expert is not None:
            return (forced(valid, self.forced_expert, self.k, self.cfg.num_experts), logits,
                    probs, chosen)
        capacity = capacity_fn(chosen, valid) if capacity_fn else self.capacity(x.shape[0])
        return route(probs, chosen, valid, capacity), logits, probs, chosen
