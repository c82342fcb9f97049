"""The routing rules, in plain torch: shared by the megatron MoE layer (trainer/moe/router.py,
trainer/moe/layer.py) and the plain model of an export (trainer/hub.py).

DeepSpeed's own gating functions cannot be used as they are: top-2 ignores ``used_token`` (text
padding would take capacity and enter the load statistics), and top-1 scales the output by the
raw probability p1 < 1, which breaks function preservation at step 0. Here, for a batch of U
routing units (tokens, or whole images under image-level routing):

1. logits: ``x @ W^T`` in fp32 (``jitter``: x scaled by U(1-eps, 1+eps) first, training only);
2. choose: top-k experts per unit from the softmax of the logits (``rsample`` adds Gumbel
   noise to the selection only, training only);
3. assign: capacity slots first-come first-served with every unit's first choice ahead of any
   second choice (DeepSpeed's top-2 priority); padding units and routes past capacity get
   expert -1. Capacity: ``capacity_for`` (the factor rule named by ``moe.capacity_rule``:
   DeepSpeed's or AXLearn's), or None (dropless);
4. weigh: the kept routes' probabilities renormalised to sum to 1 (top-2), or the
   straight-through ``p1 / p1.detach()`` (top-1: 1.0 forward, the router still learns);
5. aux losses and statistics over the valid (non-padding) units only.

``forced(valid, e, k)`` sends every valid unit to expert e alone with weight 1 and no capacity
limit: the MoE model then computes exactly what expert e's dense model does (per-expert
evaluation; the DMU assembly check). The noise draws match DeepSpeed's ``gumbel_rsample`` and
``multiplicative_jitter`` (same torch distributions, so the same numbers for the same RNG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.moe.config import CAPACITY_RULES, LOAD_BALANCE_MASKS

JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter default


@dataclass
class Routing:
    experts: torch.Tensor   # [U, k] long; -1 where the unit is padding or the route was dropped
    slots: torch.Tensor     # [U, k] long; position in the expert's capacity buffer (0 if none)
    weights: torch.Tensor   # [U, k] fp32; 0 where dropped
    capacity: int | None    # slots per expert (None: dropless)
    wanted: torch.Tensor    # [] routes wanted by the valid units (before capacity)


# ---- noise (training only) -------------------------------------------------------------------

def gumbel_rsample(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise (DeepSpeed's ``gumbel_rsample``): -log(-log(u)), fp32."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.Gumbel(zero, one).rsample(shape)


def multiplicative_jitter(x: torch.Tensor, epsilon: float = JITTER_EPS) -> torch.Tensor:
    """x times U(1 - eps, 1 + eps) elementwise (DeepSpeed's ``multiplicative_jitter``)."""
    if epsilon == 0:
        return x
    low = torch.tensor(1.0 - epsilon, device=x.device)
    high = torch.tensor(1.0 + epsilon, device=x.device)
    return x * torch.distributions.Uniform(low, high).rsample(x.shape)


# ---- the rules -------------------------------------------------------------------------------

def _one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``F.one_hot`` without its host reads: one_hot checks min/max of ``index`` on the host
    (two ``.item()``s, a device sync each on GPU). A comparison with ``arange`` gives the same
    int64 one-hot for indices in range and an all-zero row for any other (e.g. -1)."""
    classes = torch.arange(num_classes, device=index.device)
    return (index.unsqueeze(-1) == classes).long()


def router_logits(x: torch.Tensor, weight: torch.Tensor, noise: str = "none",
                  training: bool = False) -> torch.Tensor:
    """Router input x [U, d], weight [E, d] -> fp32 logits [U, E]."""
    x = x.float()
    if noise == "jitter" and training:
        x = multiplicative_jitter(x)
    return F.linear(x, weight.float())


def capacity_for(units: int, num_experts: int, factor: float, k: int, min_capacity: int,
                 rule: str = "deepspeed") -> int:
    """Capacity slots per expert for ``units`` routing units under a named rule.

    deepspeed  ceil(units / E * factor * k), at least ``min_capacity`` (DeepSpeed's
               ``_capacity`` in deepspeed/moe/sharded_moe.py, as Megatron's
               ``moe_expert_capacity_factor``): the slots grow with top-k.
    axlearn    floor(units * factor / E) with no ``* k``, rounded up to a multiple of 4 when it
               exceeds ``min_capacity`` (AXLearn's ``expert_capacity``), else ``min_capacity``
               (apple/axlearn, axlearn/common/mixture_of_experts.py,
               ``_compute_expert_capacity``; its default ``expert_capacity=None`` acts as 1).
               CLIP-UP's framework: at top-2 and the same factor, half DeepSpeed's slots.
    """
    if rule == "deepspeed":
        return max(math.ceil(units / num_experts * factor * k), min_capacity)
    if rule == "axlearn":
        auto = int(units * factor / num_experts)
        if auto <= min_capacity:
            return min_capacity
        return auto + (-auto % 4)
    raise ValueError(f"capacity rule {rule!r}: expected one of {', '.join(CAPACITY_RULES)}")


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
    onehot = _one_hot(order, num_experts)                      # -1 (no route): a zero row
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


def route(probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor,
          capacity: int | None) -> Routing:
    """assign + weigh of the choice ``chosen [U, k]`` (``probs [U, E]``, ``valid [U]``)."""
    experts, slots = assign(chosen, valid, probs.shape[1], capacity)
    return Routing(experts, slots, weigh(probs, experts, chosen), capacity,
                   valid.sum() * chosen.shape[1])


def forced(valid: torch.Tensor, expert: int, k: int, num_experts: int) -> Routing:
    """Every valid unit to ``expert`` only (weight 1), no capacity: dropless."""
    wanted = torch.full((valid.shape[0], k), -1, dtype=torch.long, device=valid.device)
    wanted[:, 0] = expert
    experts, slots = assign(wanted, valid, num_experts, None)
    return Routing(experts, slots, (experts >= 0).float(), None, valid.sum())


# ---- grouping routes by expert (dropless dispatch, the plain model) --------------------------

def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Kept routes per expert: experts [U, k] with -1 for none -> [E] long."""
    flat = experts.reshape(-1) + 1                                  # 0: no expert
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[1:]  # no host sync


def group_routes(experts: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept routes of ``experts [U, k]`` sorted by expert (units in order within one)
    -> (routes [R] flat indices into [U*k], their units [R], counts per expert [E])."""
    flat = experts.reshape(-1)                                      # [U*k]
    routes = torch.nonzero(flat >= 0).squeeze(1)
    routes = routes[torch.argsort(flat[routes], stable=True)]
    return routes, routes // experts.shape[1], expert_counts(experts, num_experts)


# ---- auxiliary losses (valid units only) -----------------------------------------------------

def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1)


def aux_losses(logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               valid: torch.Tensor, global_threshold: float,
               load_balance_mask: str = "topk") -> dict[str, torch.Tensor]:
    """Unweighted router losses over the valid units of one layer.

    load_balance    E * sum_e f_e * P_e; P_e: mean router probability of e; f_e (before
                    capacity), by ``load_balance_mask``: ``topk`` the fraction of the valid
                    units' k choices that picked e (DeepSpeed's ``topkgating``, k > 2); ``top1`` the fraction of valid units whose
                    first choice is e (DeepSpeed's ``top2gating`` ``mask1``, AXLearn's
                    ``Top2Gating`` ``density_1``: both count the top-1 mask only)
    z_loss          mean of logsumexp(logits)^2
    entropy_local   mean per-unit routing entropy
    entropy_global  max(0, threshold - entropy of the mean routing distribution)
    """
    e = probs.shape[1]
    if load_balance_mask == "top1":
        chosen = chosen[:, :1]
    elif load_balance_mask != "topk":
        raise ValueError(f"load-balance mask {load_balance_mask!r}: expected one of "
                         f"{', '.join(LOAD_BALANCE_MASKS)}")
    w = valid.to(probs.dtype)
    n = w.sum().clamp_min(1.0)
    mean_p = (probs * w[:, None]).sum(0) / n                    # [E]
    picks = _one_hot(chosen, e).to(probs.dtype).sum(1)          # [U, E]
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
