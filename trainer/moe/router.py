"""The router: DeepSpeed's ``TopKGate`` (its ``wg`` projection, noise policies and capacity
settings) with the routing rules that upcycling needs.

DeepSpeed's own gating functions cannot be used as they are: top-2 ignores ``used_token`` (text
padding would take capacity and enter the load statistics), and top-1 scales the output by the
raw probability p1 < 1, which breaks function preservation at step 0. Here, for a batch of U
routing units (tokens, or whole images under image-level routing):

1. choose: top-k experts per unit from the softmax of the fp32 logits (``rsample`` adds Gumbel
   noise to the selection only; ``jitter`` scales the router input by U(1-eps, 1+eps));
2. assign: capacity slots first-come first-served with every unit's first choice ahead of any
   second choice (DeepSpeed's top-2 priority); padding units and routes past capacity get
   expert -1;
3. weigh: the kept routes' probabilities renormalised to sum to 1 (top-2), or the
   straight-through ``p1 / p1.detach()`` (top-1: 1.0 forward, the router still learns);
4. aux losses and statistics over the valid (non-padding) units only.

``Router.forced_expert = e`` (see ``trainer.moe.layer.force_expert``) sends every valid unit to
expert e alone with weight 1 and no capacity limit: the MoE model then computes exactly what
expert e's dense model does (per-expert evaluation; the DMU assembly check).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter

from trainer.moe.config import MoEConfig

_DS_NOISE = {"none": None, "jitter": "Jitter", "rsample": "RSample"}


@dataclass
class Routing:
    experts: torch.Tensor   # [U, k] long; -1 where the unit is padding or the route was dropped
    slots: torch.Tensor     # [U, k] long; position in the expert's capacity buffer (0 if none)
    weights: torch.Tensor   # [U, k] fp32; 0 where dropped
    capacity: int | None    # slots per expert (None: dropless)
    wanted: torch.Tensor    # [] routes wanted by the valid units (before capacity)


def capacity_for(units: int, num_experts: int, factor: float, k: int, min_capacity: int) -> int:
    """DeepSpeed's rule: ceil(units / E * factor * k), at least ``min_capacity``."""
    return max(math.ceil(units / num_experts * factor * k), min_capacity)


def choose(logits: torch.Tensor, k: int, noise: str = "none", training: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (experts [U, k] long, probs [U, E] fp32)."""
    probs = F.softmax(logits, dim=-1)
    scores = probs
    if noise == "rsample" and training:
        scores = logits + gumbel_rsample(logits.shape, device=logits.device)
    return torch.topk(scores, k, dim=-1).indices, probs


def assign(experts: torch.Tensor, valid: torch.Tensor, num_experts: int,
           capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity slots, first choices before second ones, units in order.
    -> (experts with -1 for padding / dropped routes, slots)."""
    u, k = experts.shape
    experts = torch.where(valid[:, None], experts, -1)
    order = experts.t().reshape(-1)                             # [k*U]: all 1st, then all 2nd
    onehot = F.one_hot(order.clamp_min(0), num_experts) * (order >= 0)[:, None]
    slots = (onehot.cumsum(0) - 1).gather(1, order.clamp_min(0)[:, None]).squeeze(1)
    slots = slots.view(k, u).t()                                # [U, k]
    if capacity is not None:
        experts = torch.where(slots < capacity, experts, -1)
    slots = torch.where(experts >= 0, slots, 0)
    return experts, slots


def weigh(probs: torch.Tensor, experts: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Combine weights [U, k]: renormalised over the kept routes (top-1: straight-through)."""
    p = probs.gather(1, chosen)                                 # [U, k]
    kept = (experts >= 0).to(p.dtype)
    if chosen.shape[1] == 1:
        return p / p.detach() * kept
    p = p * kept
    return p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).eps)


# ---- auxiliary losses (valid units only) -----------------------------------------------------

def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def aux_losses(logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               valid: torch.Tensor, global_threshold: float) -> dict[str, torch.Tensor]:
    """Unweighted router losses over the valid units of one layer.

    load_balance    E * sum_e f_e * P_e; f_e: fraction of the valid units' k choices that
                    picked e (before capacity), P_e: mean router probability of e
    z_loss          mean of logsumexp(logits)^2
    entropy_local   mean per-unit routing entropy
    entropy_global  max(0, threshold - entropy of the mean routing distribution)
    """
    e = probs.shape[1]
    w = valid.to(probs.dtype)
    n = w.sum().clamp_min(1.0)
    mean_p = (probs * w[:, None]).sum(0) / n                    # [E]
    picks = F.one_hot(chosen, e).to(probs.dtype).sum(1)         # [U, E]
    frac = (picks * w[:, None]).sum(0) / (n * chosen.shape[1])  # [E]
    return {
        "load_balance": e * (frac * mean_p).sum(),
        "z_loss": (torch.logsumexp(logits, -1).pow(2) * w).sum() / n,
        "entropy_local": (_entropy(probs) * w).sum() / n,
        "entropy_global": F.relu(global_threshold - _entropy(mean_p)),
    }


def superclass_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mobile V-MoE's router guidance: mean cross-entropy between the router logits [U, E] and
    each unit's super-class (= expert index) ``targets [U]``; units with target < 0 (no class
    label, padding) do not count. 0 when no unit has a target."""
    keep = (targets >= 0).to(logits.dtype)
    ce = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


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
        x = x.float()
        if self.cfg.noisy_gate == "jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        return F.linear(x, self.wg.weight.float())

    def capacity(self, units: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity_for(units, self.cfg.num_experts, factor, self.k, self.min_capacity)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, capacity_fn=None):
        """x [U, d], valid [U] bool. ``capacity_fn(chosen [U, k], valid) -> int | None``
        decides the capacity after the choice (dropless: None; no-drop: the busiest expert
        over the EP group); by default DeepSpeed's factor rule. -> (Routing, logits, probs,
        chosen)."""
        logits = self.logits(x)
        chosen, probs = choose(logits, self.k, self.cfg.noisy_gate, self.training)
        if self.forced_expert is not None:
            return self._forced(valid), logits, probs, chosen
        capacity = capacity_fn(chosen, valid) if capacity_fn else self.capacity(x.shape[0])
        experts, slots = assign(chosen, valid, self.cfg.num_experts, capacity)
        routing = Routing(experts, slots, weigh(probs, experts, chosen), capacity,
                          valid.sum() * self.k)
        return routing, logits, probs, chosen

    def _forced(self, valid: torch.Tensor) -> Routing:
        """Every valid unit to ``forced_expert`` only (weight 1), no capacity: dropless."""
        u = valid.shape[0]
        wanted = torch.full((u, self.k), -1, dtype=torch.long, device=valid.device)
        wanted[:, 0] = self.forced_expert
        experts, slots = assign(wanted, valid, self.cfg.num_experts, None)
        return Routing(experts, slots, (experts >= 0).float(), None, valid.sum())
