"""The routing rules (trainer/moe/routing.py) against hand computations: aux losses, capacity
slot assignment, combine weights, whole routes, the noise draws.

Tolerances: router aux losses from float64 inputs, abs diff <= 1e-6 against python-float loops
(measured <= 2e-16); routing decisions and capacity slots exact.
"""
import math

import pytest
import torch

AUX_NAMES = ("load_balance", "z_loss", "entropy_local", "entropy_global")


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max())

# --------------------------------------------------------------------------- router: aux losses

LOGITS = [[1.0, 0.2, -0.5],
          [0.1, 1.5, 0.3],
          [4.0, -3.0, -1.0],   # invalid (padding): extreme, so counting it would show
          [-0.2, 0.4, 0.9],
          [0.7, -0.1, 0.8]]
VALID = [True, True, False, True, True]
CHOSEN2 = [[0, 1], [1, 2], [0, 2], [2, 1], [2, 0]]   # by hand from LOGITS


def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def _entropy(p):
    return -sum(q * math.log(q) for q in p if q > 0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("threshold", [1.5, math.log(3), 0.01])
@pytest.mark.parametrize("mask", ["topk", "top1"])
def test_aux_losses_hand_case(k, threshold, mask):
    from trainer.moe.routing import aux_losses

    logits = torch.tensor(LOGITS, dtype=torch.float64)
    chosen = torch.tensor(CHOSEN2)[:, :k]
    assert torch.equal(torch.topk(logits, k, dim=-1).indices, chosen)  # the hand choice
    got = aux_losses(logits, torch.softmax(logits, -1), chosen, torch.tensor(VALID), threshold,
                     mask)

    e = 3
    units = [u for u in range(5) if VALID[u]]
    n = len(units)
    probs = [_softmax(r) for r in LOGITS]
    counted = k if mask == "topk" else 1       # top1: the first choice only
    f = [sum(CHOSEN2[u][:counted].count(x) for u in units) / (n * counted) for x in range(e)]
    mean_p = [sum(probs[u][x] for u in units) / n for x in range(e)]
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in LOGITS]
    want = {
        "load_balance": e * sum(f[x] * mean_p[x] for x in range(e)),
        "z_loss": sum(lse[u] ** 2 for u in units) / n,
        "entropy_local": sum(_entropy(probs[u]) for u in units) / n,
        "entropy_global": max(0.0, threshold - _entropy(mean_p)),
    }
    if threshold < 0.1:
        assert want["entropy_global"] == 0.0
    else:
        assert want["entropy_global"] > 0.0
    for name in AUX_NAMES:
        assert abs(float(got[name]) - want[name]) <= 1e-6, (name, float(got[name]), want[name])


# --------------------------------------------------------------------------- router: assign

def ref_assign(chosen, valid, num_experts, capacity):
    """Python loops: all first choices (units in order), then all second choices; a route
    takes the next slot of its expert if one is left."""
    u, k = len(chosen), len(chosen[0])
    experts = [[-1] * k for _ in range(u)]
    slots = [[0] * k for _ in range(u)]
    used = [0] * num_experts
    for j in range(k):
        for i in range(u):
            if not valid[i]:
                continue
            e = chosen[i][j]
            if capacity is None or used[e] < capacity:
                experts[i][j], slots[i][j] = e, used[e]
            used[e] += 1
    return experts, slots


def test_assign_top1_tight_capacity():
    from trainer.moe.routing import assign

    chosen = torch.tensor([[0], [0], [0], [1], [2], [2], [2], [2]])
    experts, slots = assign(chosen, torch.ones(8, dtype=torch.bool), 3, 2)
    assert experts.squeeze(1).tolist() == [0, 0, -1, 1, 2, 2, -1, -1]
    assert slots.squeeze(1).tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    # random cases: dropped = sum_e max(0, n_e - C)
    g = torch.Generator().manual_seed(0)
    for cap in (1, 3, 7, 50):
        chosen = torch.randint(0, 4, (50, 1), generator=g)
        experts, slots = assign(chosen, torch.ones(50, dtype=torch.bool), 4, cap)
        n = [sum(1 for c in chosen[:, 0].tolist() if c == x) for x in range(4)]
        assert int((experts < 0).sum()) == sum(max(0, n[x] - cap) for x in range(4))
        ref_e, ref_s = ref_assign(chosen.tolist(), [True] * 50, 4, cap)
        assert experts.tolist() == ref_e and slots.tolist() == ref_s


def test_assign_top2_first_choices_first():
    from trainer.moe.routing import assign

    # 6 units / 3 experts / C = 2. First choices fill e0 (u0, u1; u3 dropped), e1 (u2, u5),
    # e2 (u4); of the second choices only u1 -> e2 finds a slot. (Unit-order interleaving
    # would instead keep u0 -> e1 and drop u5 -> e1.)
    chosen = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 1], [1, 2]])
    experts, slots = assign(chosen, torch.ones(6, dtype=torch.bool), 3, 2)
    assert experts.tolist() == [[0, -1], [0, 2], [1, -1], [-1, -1], [2, -1], [1, -1]]
    assert slots.tolist() == [[0, 0], [1, 1], [0, 0], [0, 0], [0, 0], [1, 0]]
    assert int((experts < 0).sum()) == 6

    # unit 0 is padding: -1 on both routes, no slot taken (u1 moves to slot 0 of e0, u3 keeps
    # its first choice at slot 1)
    valid = torch.tensor([False, True, True, True, True, True])
    experts, slots = assign(chosen, valid, 3, 2)
    assert experts.tolist() == [[-1, -1], [0, 2], [1, -1], [0, -1], [2, -1], [1, -1]]
    assert slots.tolist() == [[0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [1, 0]]

    # dropless: every valid route kept, padding still -1
    experts, slots = assign(chosen, valid, 3, None)
    assert experts.tolist() == [[-1, -1]] + chosen[1:].tolist()
    assert slots.tolist() == [[0, 0], [0, 1], [0, 2], [1, 2], [0, 3], [1, 2]]

    # random cases against the loop reference, with padding
    g = torch.Generator().manual_seed(1)
    for cap in (1, 4, 9, None):
        logits = torch.randn(40, 5, generator=g)
        chosen = torch.topk(logits, 2, dim=-1).indices
        valid = torch.rand(40, generator=g) > 0.3
        experts, slots = assign(chosen, valid, 5, cap)
        ref_e, ref_s = ref_assign(chosen.tolist(), valid.tolist(), 5, cap)
        assert experts.tolist() == ref_e and slots.tolist() == ref_s
        assert (experts[~valid] == -1).all()


# --------------------------------------------------------------------------- router: weigh

def test_weigh_top2_renormalised():
    from trainer.moe.routing import weigh

    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(5, 4, generator=g), -1)
    chosen = torch.topk(probs, 2, dim=-1).indices
    experts = chosen.clone()
    experts[1, 1] = -1            # second route dropped
    experts[2, 0] = -1            # first route dropped, second kept
    experts[3] = -1               # both dropped (or padding)
    w = weigh(probs, experts, chosen)
    for u in range(5):
        p = [float(probs[u, chosen[u, j]]) if experts[u, j] >= 0 else 0.0 for j in range(2)]
        s = sum(p)
        want = [x / s for x in p] if s > 0 else [0.0, 0.0]
        assert w[u].tolist() == pytest.approx(want, abs=1e-7), u
    assert w[1].tolist() == [1.0, 0.0] and w[2].tolist() == [0.0, 1.0]
    assert w[3].tolist() == [0.0, 0.0]


def test_weigh_top1_straight_through():
    from trainer.moe.routing import weigh

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    chosen = torch.topk(probs, 1, dim=-1).indices
    experts = chosen.clone()
    experts[4, 0] = -1
    w = weigh(probs, experts, chosen)
    assert w.squeeze(1).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]   # exactly
    c = torch.randn(6, 1, generator=g, dtype=torch.float64)
    (w * c).sum().backward()
    # d(p_e / stopgrad(p_e)) / dlogits = d log p_e / dlogits = onehot(e) - p
    p = probs.detach()
    want = torch.zeros(6, 4, dtype=torch.float64)
    for u in range(6):
        if u == 4:
            continue
        for x in range(4):
            want[u, x] = c[u, 0] * ((1.0 if x == chosen[u, 0] else 0.0) - p[u, x])
    assert logits.grad[:4].abs().sum() > 0
    assert max_diff(logits.grad, want) <= 1e-12


# --------------------------------------------------------------------------- router: route

def test_route_and_forced_hand_case():
    """capacity_for, route (assign + weigh), forced and group_routes on 4 units / 3 experts,
    unit 2 padding, all worked out by hand."""
    from trainer.moe.routing import capacity_for, forced, group_routes, route

    assert capacity_for(4, 3, 0.25, 2, 1) == 1       # ceil(4 / 3 * 0.25 * 2) = ceil(0.67)
    assert capacity_for(4, 3, 0.5, 2, 1) == 2        # ceil(1.33)
    assert capacity_for(4, 3, 0.25, 2, 4) == 4       # min_capacity
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]],
                         dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])
    valid = torch.tensor([True, True, False, True])

    # C = 1: 1st choices u0 -> e0 kept, u1 -> e0 dropped, u3 -> e2 kept; 2nd choices
    # u0 -> e1 kept, u1 -> e2 and u3 -> e1 dropped
    r = route(probs, chosen, valid, 1)
    assert r.experts.tolist() == [[0, 1], [-1, -1], [-1, -1], [2, -1]]
    assert r.slots.tolist() == [[0, 0]] * 4
    assert max_diff(r.weights, torch.tensor([[2 / 3, 1 / 3], [0, 0], [0, 0], [1, 0]],
                                              dtype=torch.float64)) <= 1e-15
    assert r.capacity == 1 and int(r.wanted) == 6

    r = route(probs, chosen, valid, None)             # dropless
    assert r.experts.tolist() == [[0, 1], [0, 2], [-1, -1], [2, 1]]
    assert r.slots.tolist() == [[0, 0], [1, 1], [0, 0], [0, 1]]
    want = torch.tensor([[2 / 3, 1 / 3], [5 / 9, 4 / 9], [0, 0], [7 / 9, 2 / 9]],
                        dtype=torch.float64)
    assert max_diff(r.weights, want) <= 1e-15
    assert r.capacity is None and int(r.wanted) == 6
    routes, units, counts = group_routes(r.experts, 3)
    assert routes.tolist() == [0, 2, 1, 7, 3, 6]      # flat [U*k] indices, by expert
    assert units.tolist() == [0, 1, 0, 3, 1, 3] and counts.tolist() == [2, 2, 2]

    r = route(probs, chosen[:, :1], valid, 1)         # top-1: weight exactly 1
    assert r.experts.tolist() == [[0], [-1], [-1], [2]]
    assert r.weights.tolist() == [[1.0], [0.0], [0.0], [1.0]] and int(r.wanted) == 3

    r = forced(valid, 1, 2, 3)
    assert r.experts.tolist() == [[1, -1], [1, -1], [-1, -1], [1, -1]]
    assert r.slots.tolist() == [[0, 0], [1, 0], [0, 0], [2, 0]]
    assert r.weights.tolist() == [[1, 0], [1, 0], [0, 0], [1, 0]]
    assert r.capacity is None and int(r.wanted) == 3


def test_noise_draws_are_deepspeeds():
    """routing.py's Gumbel and jitter noise: DeepSpeed's draws for the same RNG state."""
    from deepspeed.moe import sharded_moe as ds

    from trainer.moe.routing import gumbel_rsample, multiplicative_jitter

    x = torch.randn(64, 8)
    for mine, theirs in ((lambda: gumbel_rsample((64, 8), x.device),
                          lambda: ds.gumbel_rsample((64, 8), x.device)),
                         (lambda: multiplicative_jitter(x),
                          lambda: ds.multiplicative_jitter(x, x.device))):
        torch.manual_seed(5)
        a = mine()
        torch.manual_seed(5)
        assert torch.equal(a, theirs())
    assert multiplicative_jitter(x, 0.0) is x
