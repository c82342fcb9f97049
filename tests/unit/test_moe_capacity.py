"""The capacity rules (``moe.capacity_rule``) and the load-balance mask
(``moe.aux.load_balance_mask``) against hand counts and against DeepSpeed's own gates.

- ``capacity_for``: a table worked out by hand for both rules (exact).
- The megatron MoE layer (trainer/moe/layer.py) and the plain model of an export
  (trainer/hub.py): routes kept per expert under each rule at top-1 and top-2, token and image
  routing, on inputs whose routing is known by construction (exact integer counts).
- DeepSpeed peers: its ``_capacity`` as used by ``top1gating`` / ``top2gating`` equals the
  ``deepspeed`` rule, and its gates' ``l_aux`` equals our load balance (top2gating: ``top1``
  mask; topkgating: ``topk``) to 1e-6 (fp32 gates; measured <= 1e-7).
"""
import pytest
import torch

import peers

E = 4


@pytest.mark.parametrize("units,factor,k,min_cap,deepspeed,axlearn", [
    # deepspeed: ceil(U / E * CF * k) vs min; axlearn: floor(U * CF / E) -> next multiple of 4
    # when above min, else min
    (68, 1.0, 1, 1, 17, 20),    # ceil(17) = 17          | floor(17) = 17 -> 20
    (68, 1.0, 2, 1, 34, 20),    # ceil(34) = 34          | 17 -> 20 (no * k)
    (68, 2.0, 2, 4, 68, 36),    # ceil(68) = 68          | floor(34) = 34 -> 36
    (12, 1.0, 2, 1, 6, 4),      # ceil(6) = 6            | floor(3) = 3 -> 4
    (12, 1.0, 2, 4, 6, 4),      # 6                      | 3 <= min 4 -> 4
    (20, 1.0, 2, 4, 10, 8),     # 10                     | floor(5) = 5 -> 8
    (3, 1.0, 2, 1, 2, 1),       # ceil(1.5) = 2          | floor(0.75) = 0 -> min 1
    (10, 1.25, 2, 0, 7, 4),     # ceil(6.25) = 7         | floor(3.125) = 3 > min 0 -> 4
])
def test_capacity_for_hand_table(units, factor, k, min_cap, deepspeed, axlearn):
    from trainer.moe.routing import capacity_for

    assert capacity_for(units, E, factor, k, min_cap, "deepspeed") == deepspeed
    assert capacity_for(units, E, factor, k, min_cap, "axlearn") == axlearn
    assert capacity_for(units, E, factor, k, min_cap) == deepspeed   # the default rule


def test_capacity_rule_unknown_is_refused():
    from trainer.config import ConfigError, load_config
    from trainer.moe.routing import capacity_for

    with pytest.raises(ValueError, match="capacity rule 'gshard'"):
        capacity_for(8, 4, 1.0, 1, 1, "gshard")
    base = ["model.vision.moe.num_experts=4", "model.vision.moe.every=1"]
    with pytest.raises(ConfigError, match=r"model\.vision\.moe\.capacity_rule='gshard'"):
        load_config(None, [*base, "model.vision.moe.capacity_rule=gshard"])
    with pytest.raises(ConfigError, match=r"model\.vision\.moe\.aux\.load_balance_mask='all'"):
        load_config(None, [*base, "model.vision.moe.aux.load_balance_mask=all"])


# ---- routes kept per expert, by hand -------------------------------------------------------
#
# Every routing unit's router input is +v or -v with router rows (2v, v, 0, -v): +v units choose
# experts (0, 1), -v units (3, 2). Unit u is -v when u % 4 == 3. Capacity factor 1, min 1.
#
# token routing, 4 images x 17 tokens = 68 units (51 +v, 17 -v):
#   deepspeed top-1  C = ceil(68/4)     = 17: e0 17 of 51, e3 17 of 17        -> [17, 0, 0, 17]
#   deepspeed top-2  C = ceil(68/4*2)   = 34: e0 34, e3 17; e1 34, e2 17      -> [34, 34, 17, 17]
#   axlearn   top-1  C = floor(68/4)=17 -> 20: e0 20, e3 17                   -> [20, 0, 0, 17]
#   axlearn   top-2  C = 20 (no * k):   e0 20, e3 17; e1 20, e2 17            -> [20, 20, 17, 17]
# image routing (the class token decides), 12 images (9 +v, 3 -v), 17 tokens each:
#   deepspeed top-1  C = ceil(12/4)   = 3 images: [3, 0, 0, 3] images         -> x17 tokens
#   deepspeed top-2  C = ceil(12/4*2) = 6:        [6, 6, 3, 3]
#   axlearn   top-1  C = floor(3) -> 4:           [4, 0, 0, 3]
#   axlearn   top-2  C = 4:                       [4, 4, 3, 3]
HAND = {
    ("token", "deepspeed", 1): (17, [17, 0, 0, 17]),
    ("token", "deepspeed", 2): (34, [34, 34, 17, 17]),
    ("token", "axlearn", 1): (20, [20, 0, 0, 17]),
    ("token", "axlearn", 2): (20, [20, 20, 17, 17]),
    ("image", "deepspeed", 1): (3, [3, 0, 0, 3]),
    ("image", "deepspeed", 2): (6, [6, 6, 3, 3]),
    ("image", "axlearn", 1): (4, [4, 0, 0, 3]),
    ("image", "axlearn", 2): (4, [4, 4, 3, 3]),
}
CASES = sorted(HAND)
SEQ = 17          # tiny preset: (32 / 8)^2 patches + the class token


def _signed_hidden(routing: str, width: int, seed: int = 0):
    """-> (hidden [s, b, d] sequence-major as megatron's, v [d]); unit u is -v iff u % 4 == 3
    (token units in sequence-major order, image units by image; other image tokens random)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(width, generator=g)
    b = 4 if routing == "token" else 12
    if routing == "token":
        sign = torch.tensor([-1.0 if u % 4 == 3 else 1.0 for u in range(SEQ * b)])
        hidden = (sign[:, None] * v).view(SEQ, b, width)
    else:
        hidden = torch.randn(SEQ, b, width, generator=g)
        hidden[0] = torch.stack([-v if i % 4 == 3 else v for i in range(b)])
    return hidden, v


def _router_rows(v):
    return torch.stack([2 * v, v, 0 * v, -v])                      # [E, d]


def _moe(routing, rule, k):
    return dict(num_experts=E, every=1, top_k=k, routing=routing, capacity_rule=rule,
                capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1)


def _load_balance_by_hand(v, routing, mask, k):
    """E * sum_e f_e * P_e in float64: 3 of 4 units are +v (choices 0, 1), 1 of 4 -v (3, 2)."""
    vv = float(v.double() @ v.double())
    plus = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64) * vv, 0)
    minus = torch.softmax(torch.tensor([-2.0, -1.0, 0.0, 1.0], dtype=torch.float64) * vv, 0)
    mean_p = 0.75 * plus + 0.25 * minus
    first = torch.tensor([0.75, 0.0, 0.0, 0.25], dtype=torch.float64)
    second = torch.tensor([0.0, 0.75, 0.25, 0.0], dtype=torch.float64)
    f = first if mask == "top1" or k == 1 else (first + second) / 2
    return float(E * (f * mean_p).sum())


@pytest.mark.parametrize("routing,rule,k", CASES)
def test_layer_counts_by_hand(dist1, routing, rule, k):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from trainer.config import load_config
    from trainer.models.build import build_for_training
    from trainer.moe.layer import moe_mlps

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    mask = "top1" if rule == "axlearn" else "topk"                 # both reach the layer
    over = [f"model.vision.moe.{a}={b}" for a, b in _moe(routing, rule, k).items()]
    over.append(f"model.vision.moe.aux.load_balance_mask={mask}")
    cfg = load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *over])
    torch.manual_seed(0)
    model = build_for_training(cfg, dist1)
    mlp = moe_mlps(model.visual)[0]
    hidden, v = _signed_hidden(routing, mlp.router.wg.weight.shape[1])
    with torch.no_grad():
        mlp.router.wg.weight.copy_(_router_rows(v))
    capacity, per_expert = HAND[(routing, rule, k)]
    for training in (True, False):                 # capacity_factor, then eval_capacity_factor
        mlp.train(training)
        mlp(hidden.clone().requires_grad_(training))
        stats = mlp.pop_stats()
        per_token = SEQ if routing == "image" else 1
        assert stats["tokens_per_expert"].tolist() == [c * per_token for c in per_expert]
        assert int(stats["routes_kept"]) == sum(per_expert) * per_token
        want = _load_balance_by_hand(v, routing, mask, k)
        assert abs(float(stats["aux_load_balance"]) - want) <= 1e-6, (mask, want)
        assert mlp.router.capacity(hidden.shape[1] if routing == "image"
                                   else hidden.shape[0] * hidden.shape[1]) == capacity


@pytest.mark.parametrize("routing,rule,k", CASES)
def test_plain_model_counts_by_hand(routing, rule, k):
    from trainer.hub import MoEMLP
    from trainer.moe.config import MoEConfig
    from trainer.moe.routing import expert_counts

    width = 16
    mlp = MoEMLP(width, 32, MoEConfig(**_moe(routing, rule, k)), "gelu").eval()
    hidden, v = _signed_hidden(routing, width)
    with torch.no_grad():
        mlp.router.weight.copy_(_router_rows(v))
    seen = []
    route = mlp.route
    mlp.route = lambda x, valid: seen.append(route(x, valid)) or seen[-1]
    with torch.no_grad():
        mlp(hidden.transpose(0, 1))                                # [b, s, d]
    capacity, per_expert = HAND[(routing, rule, k)]
    assert seen[0].capacity == capacity
    assert expert_counts(seen[0].experts, E).tolist() == per_expert


# ---- DeepSpeed peers -----------------------------------------------------------------------

@pytest.mark.parametrize("units", [7, 64, 130])
def test_deepspeed_rule_is_deepspeeds_capacity(units):
    from deepspeed.moe.sharded_moe import top1gating, top2gating
    from trainer.moe.routing import capacity_for

    logits = torch.randn(units, E, generator=torch.Generator().manual_seed(units))
    for k, gate in ((1, top1gating), (2, top2gating)):
        for factor, min_cap in ((1.0, 1), (1.25, 4), (2.0, 0)):
            kw = dict(top2_2nd_expert_sampling=False) if k == 2 else dict(use_rts=False)
            dispatch = gate(logits.clone(), factor, min_cap, **kw)[2]     # [S, E, C]
            assert dispatch.shape[2] == capacity_for(units, E, factor, k, min_cap,
                                                     "deepspeed"), (k, factor, min_cap)


@pytest.mark.parametrize("seed", [0, 1])
def test_load_balance_masks_are_deepspeeds(seed):
    """top1 = DeepSpeed's top2gating l_aux (first-choice mask); topk = its topkgating (all k
    choices / k). All units valid (DeepSpeed's top-2 gate has no padding notion)."""
    from deepspeed.moe.sharded_moe import top2gating, topkgating
    from trainer.moe.routing import aux_losses, choose

    logits = 2 * torch.randn(50, E, generator=torch.Generator().manual_seed(seed))
    chosen, probs = choose(logits, 2)
    valid = torch.ones(50, dtype=torch.bool)
    ours = {m: float(aux_losses(logits, probs, chosen, valid, 0.0, m)["load_balance"])
            for m in ("top1", "topk")}
    ds_top1 = float(top2gating(logits.clone(), 2.0, 1, top2_2nd_expert_sampling=False)[0])
    ds_topk = float(topkgating(logits.clone(), 2, 2.0, 1)[0])
    assert abs(ours["top1"] - ds_top1) <= 1e-6 and abs(ours["topk"] - ds_topk) <= 1e-6
    assert abs(ours["top1"] - ours["topk"]) > 1e-3          # the two definitions differ here
