"""MoE CLIP (trainer/moe/) on CPU, one process: the MoE layer inside the tiny CLIP, upcycling
and the MoE config errors (the routing rules: tests/unit/test_moe_routing.py).

Every expectation is computed directly in the test (python loops / plain torch), never by the
helper under test. Tolerances:
- drop counts and router statistics: exact;
- padding invariance: embeddings and float statistics (entropy, aux losses) abs diff <= 1e-6
  (measured 0: the same arithmetic on the real tokens), integer statistics exact;
- dropless vs capacity dispatch at ample capacity: embeddings <= 1e-6 abs and every
  parameter gradient <= 1e-6 * max(1, max |grad|) (measured: embeddings 0, gradients
  2e-7 relative on expert weights whose gradients reach ~20, i.e. float32 rounding; the two
  paths sum the same expert terms in another order, every dense gradient is identical);
- upcycled vs dense embeddings: max abs diff <= 1e-6 (measured 0 at top-1, 2.4e-7 at top-2
  where w1 + w2 is 1 only to float32 rounding), with routers set from the layers' inputs so
  that every expert of every MoE layer serves tokens (asserted: tokens_per_expert > 0; a
  random router leaves some experts unreached, whose wrong copy would pass);
- aux-loss gradient on the router against autograd of a float64 re-computation from the
  captured layer input: <= 1e-6 * max(1, max |grad|) (measured <= 8e-9 abs, 2.7e-7 for z_loss
  whose gradient reaches 1.3: the router's logits are float32); with every aux weight 0 the
  router gradient is exactly zero.
"""
import math

import pytest
import torch

import peers

AUX_NAMES = ("load_balance", "z_loss", "entropy_local", "entropy_global")


# --------------------------------------------------------------------------- helpers

def make_model(layout, overrides, seed=0):
    from trainer.config import load_config
    from trainer.models.build import build_for_training

    cfg = load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])
    torch.manual_seed(seed)
    return build_for_training(cfg, layout), cfg


def moe_layers(model):
    """[(tower name, block index, MoEMLP)] of every MoE block."""
    from trainer.moe.layer import MoEMLP

    out = []
    for name, tower in (("vision", model.visual), ("text", model.text)):
        for i, layer in enumerate(tower.transformer.layers):
            if isinstance(layer.mlp, MoEMLP):
                out.append((name, i, layer.mlp))
    return out


def tower_moe(tower, **kw):
    return [f"model.{tower}.moe.{k}={v}" for k, v in kw.items()]


def capture_inputs(model):
    """Forward pre-hooks on every MoE layer: -> (store, handles); store[(tower, i)] is a list of
    (hidden [s, b, d], padding_mask [b, s] or None) per call."""
    store, handles = {}, []
    for name, i, mlp in moe_layers(model):
        def hook(module, args, kwargs, key=(name, i)):
            pm = kwargs.get("padding_mask")
            store.setdefault(key, []).append(
                (args[0].detach().clone(), None if pm is None else pm.detach().clone()))
        handles.append(mlp.register_forward_pre_hook(hook, with_kwargs=True))
    return store, handles


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(autouse=True)
def _aux_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield


# --------------------------------------------------------------------------- the layer in CLIP

def _pad_text(text, seed):
    """Replace every token after the first end-of-text by other random ids (some of them
    end-of-text again)."""
    g = torch.Generator().manual_seed(seed)
    eot = peers.VOCAB - 1
    out = text.clone()
    for i, row in enumerate(text.tolist()):
        e = row.index(eot)
        if e + 1 < len(row):
            out[i, e + 1:] = torch.randint(1, peers.VOCAB, (len(row) - e - 1,), generator=g)
            out[i, -1] = eot
    assert not torch.equal(out, text)
    return out


@pytest.mark.parametrize("top_k,dispatch", [(2, "capacity"), (1, "capacity"), (2, "dropless")])
def test_text_padding_changes_nothing(dist1, top_k, dispatch):
    model, _ = make_model(dist1, tower_moe(
        "text", num_experts=4, every=1, router_init="normal", router_init_std=0.5,
        top_k=top_k, dispatch=dispatch, capacity_factor=0.5, eval_capacity_factor=0.5,
        min_capacity=0))
    model.eval()
    layers = moe_layers(model)
    assert [(t, i) for t, i, _ in layers] == [("text", 0), ("text", 1)]
    _, text = peers.sample_inputs(n=4, seed=5)
    other = _pad_text(text, seed=6)
    runs = []
    for t in (text, other):
        with torch.no_grad():
            emb = model.encode_text(t)
        runs.append((emb, [m.pop_stats() for _, _, m in layers]))
    (a, sa), (b, sb) = runs
    assert max_diff(a, b) <= 1e-6
    for x, y in zip(sa, sb):
        assert set(x) == set(y)
        for key in ("tokens_per_expert", "routes_wanted", "routes_kept", "units", "calls"):
            assert torch.equal(x[key], y[key]), key
        for key in ["entropy_sum"] + [f"aux_{n}" for n in AUX_NAMES]:
            assert abs(float(x[key]) - float(y[key])) <= 1e-6, key
    # the statistics count the real tokens only
    real = sum(row.index(peers.VOCAB - 1) + 1 for row in text.tolist())
    assert all(int(s["units"]) == real and int(s["routes_wanted"]) == real * top_k for s in sa)
    if dispatch == "capacity":
        assert any(int(s["routes_kept"]) < real * top_k for s in sa)  # the capacity was tight


@pytest.mark.parametrize("capacity_factor,drop_tokens", [(8, True), (0.25, False)])
def test_dropless_equals_ample_capacity(dist1, capacity_factor, drop_tokens):
    """Capacity dispatch at a capacity nothing overflows (a large factor, or drop_tokens=False:
    the busiest expert's load) computes what dropless dispatch does."""
    common = []
    for tower in ("vision", "text"):
        common += tower_moe(tower, num_experts=4, every=1, router_init="normal",
                            router_init_std=0.5, top_k=2, capacity_factor=capacity_factor,
                            eval_capacity_factor=capacity_factor, min_capacity=0,
                            drop_tokens=drop_tokens,
                            **{"aux.z_loss": 0.01, "aux.entropy_local": 0.01})
    cap, _ = make_model(dist1, common + ["model.vision.moe.dispatch=capacity",
                                         "model.text.moe.dispatch=capacity"], seed=0)
    drop, _ = make_model(dist1, common + ["model.vision.moe.dispatch=dropless",
                                          "model.text.moe.dispatch=dropless"], seed=1)
    drop.load_state_dict(cap.state_dict())
    images, text = peers.sample_inputs(n=4, seed=7)
    g = torch.Generator().manual_seed(8)
    r1, r2 = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    outs = []
    for m in (cap, drop):
        m.train()
        out = m(images, text)
        i, t, s = out["image_features"], out["text_features"], out["logit_scale"]
        ((i * r1).sum() + (t * r2).sum() + s).backward()
        stats = [mlp.pop_stats() for _, _, mlp in moe_layers(m)]
        assert all(int(x["routes_kept"]) == int(x["routes_wanted"]) for x in stats)  # no drop
        outs.append((i.detach(), t.detach(), dict(m.named_parameters())))
    (ic, tc, pc), (id_, td, pd) = outs
    assert max_diff(ic, id_) <= 1e-6 and max_diff(tc, td) <= 1e-6
    assert set(pc) == set(pd)
    worst = 0.0
    for name, p in pc.items():
        q = pd[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = max(1.0, float(p.grad.abs().max()))
            worst = max(worst, max_diff(p.grad, q.grad) / scale)
    routers = [n for n in pc if n.endswith("gate.wg.weight")]
    assert len(routers) == 4 and all(pc[n].grad.abs().sum() > 0 for n in routers)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("top_k,routing", [(1, "token"), (2, "token"), (1, "image"),
                                           (2, "image")])
def test_tight_capacity_drop_count(dist1, top_k, routing):
    """Routes dropped at a tight capacity = sum_e max(0, n_e - C), n_e counted from the
    router's own choice on the captured layer input (image routing: one unit per image,
    decided by its class token, every token of the image follows)."""
    # capacity ~ the mean load: some experts overflow, others not. The text capacity counts
    # the padding tokens too (U = every position), about half of them here: a smaller factor.
    cfs, e_num = {"vision": 1.0, "text": 0.5}, 4
    overrides = []
    for tower, cf in cfs.items():
        overrides += tower_moe(tower, num_experts=e_num, every=1, router_init="normal",
                               router_init_std=0.5, top_k=top_k, capacity_factor=cf,
                               eval_capacity_factor=cf, min_capacity=0)
    overrides += [f"model.vision.moe.routing={routing}"]
    model, _ = make_model(dist1, overrides)
    model.train()
    store, handles = capture_inputs(model)
    images, text = peers.sample_inputs(n=8, seed=9)
    with torch.no_grad():
        model(images, text)
    for h in handles:
        h.remove()
    total_dropped, under = 0, 0
    for tower, i, mlp in moe_layers(model):
        (hidden, pm), = store[(tower, i)]
        s, b, d = hidden.shape
        if tower == "vision" and routing == "image":
            x, per_unit = hidden[0].float(), s                      # class token of each image
        else:
            x, per_unit = hidden.reshape(s * b, d).float(), 1
        units = x.shape[0]
        valid = [True] * units if pm is None else pm.t().reshape(-1).bool().tolist()
        logits = x @ mlp.router.wg.weight.detach().float().t()
        chosen = torch.topk(torch.softmax(logits, -1), top_k, dim=-1).indices.tolist()
        n = [0] * e_num
        for u in range(units):
            if valid[u]:
                for e in chosen[u]:
                    n[e] += 1
        cap = max(math.ceil(units / e_num * cfs[tower] * top_k), 0)
        dropped = sum(max(0, c - cap) for c in n)
        stats = mlp.pop_stats()
        assert int(stats["routes_wanted"]) == sum(valid) * top_k * per_unit, (tower, i)
        assert int(stats["routes_wanted"] - stats["routes_kept"]) == dropped * per_unit, \
            (tower, i)
        assert stats["tokens_per_expert"].tolist() == [min(c, cap) * per_unit for c in n], \
            (tower, i)
        total_dropped += dropped
        under += sum(1 for c in n if c < cap)
    assert total_dropped > 0 and under > 0


UPCYCLE_CASES = [(k, routing, dispatch) for routing in ("token", "image")
                 for k in (1, 2) for dispatch in ("capacity", "dropless")]


def spread_routers_(model, images, text):
    """Set every router so that step-0 routing reaches every expert of every MoE layer.

    A random router sees mostly what all units share (the class embedding for image routing,
    the common direction of the normalised text tokens): every image then picks the same
    expert and some text experts get no token, so a wrong copy of that expert goes unseen.
    Here, per MoE layer, with P the projection that removes the units' mean direction and c
    the units' deviations from their mean: E anchor units a_e of distinct directions
    (farthest-point in cosine) and router row e = P c_{a_e} / |P c_{a_e}|. The logit of
    expert f for unit u is then <P c_{a_f}, P c_u> / |P c_{a_f}|, which is largest at f = e
    for u = a_e (Cauchy-Schwarz): every expert is the first choice of its anchor at least.
    The inputs of every MoE layer equal the dense model's whatever the routers are (that is
    the property under test), so one capturing pass gives them. Function preservation holds
    for any router, so this weakens nothing; the caller asserts tokens_per_expert > 0."""
    store, handles = capture_inputs(model)
    with torch.no_grad():
        model.encode_image(images)
        model.encode_text(text)
    for h in handles:
        h.remove()
    for tower, i, mlp in moe_layers(model):
        (hidden, pm), = store[(tower, i)]
        s, b, d = hidden.shape
        if mlp.cfg.routing == "image":
            assert mlp.cfg.image_router_input == "cls"
            units = hidden[0].double()                               # class token per image
        else:
            units = hidden.reshape(s * b, d).double()
            if pm is not None:
                units = units[pm.t().reshape(-1).bool()]             # real tokens only
        m = units.mean(0)
        m = m / m.norm()
        dev = units - units.mean(0)
        dev = dev - (dev @ m)[:, None] * m[None]                     # P c_u
        unit_dir = dev / dev.norm(dim=1, keepdim=True).clamp_min(1e-12)
        anchors = [int(dev.norm(dim=1).argmax())]
        while len(anchors) < mlp.cfg.num_experts:
            closeness = (unit_dir @ unit_dir[anchors].t()).max(1).values
            closeness[anchors] = float("inf")
            anchors.append(int(closeness.argmin()))
        w = unit_dir[anchors]                                        # [E, d]
        w = w * (2.0 / (units @ w.t()).std())                        # logits of std ~2
        with torch.no_grad():
            mlp.router.wg.weight.copy_(w.to(mlp.router.wg.weight.dtype))
        mlp.pop_stats()


@pytest.fixture(scope="module")
def dense_full(dist1):
    from trainer.models.state import full_state_dict

    dense, _ = make_model(dist1, [], seed=11)
    peers.perturb_(dense, seed=12)   # nonzero biases, non-unit norms
    images, text = peers.sample_inputs(n=8, seed=13)  # image routing: 8 units for 4 experts
    with torch.no_grad():
        ref = dense.encode_image(images), dense.encode_text(text)
    return full_state_dict(dense, dist1), ref, (images, text)


@pytest.mark.parametrize("top_k,routing,dispatch", UPCYCLE_CASES)
def test_upcycle_preserves_function(dist1, dense_full, top_k, routing, dispatch):
    from trainer.models.state import load_full_state_dict
    from trainer.moe.upcycle import upcycle_state_dict

    full, (ref_i, ref_t), (images, text) = dense_full
    common = dict(num_experts=4, router_init="normal", router_init_std=0.5, top_k=top_k,
                  dispatch=dispatch, capacity_factor=4, eval_capacity_factor=4)
    overrides = (tower_moe("vision", every=1, routing=routing, **common)
                 + tower_moe("text", every=2, **common))
    model, cfg = make_model(dist1, overrides, seed=14)
    moe_full = upcycle_state_dict(full, cfg.model, seed=0)
    load_full_state_dict(model, moe_full, dist1)
    routers = [mlp.router.wg.weight for _, _, mlp in moe_layers(model)]
    assert len(routers) == 3 and all(w.abs().sum() > 0 for w in routers)
    model.eval()
    spread_routers_(model, images, text)
    with torch.no_grad():
        di = max_diff(model.encode_image(images), ref_i)
        dt = max_diff(model.encode_text(text), ref_t)
    layers = moe_layers(model)
    stats = [mlp.pop_stats() for _, _, mlp in layers]
    assert all(int(s["routes_kept"]) == int(s["routes_wanted"]) for s in stats)  # no drop
    # every expert of every MoE layer served some token: a wrong copy of any expert shows
    reached = {(t, i): s["tokens_per_expert"].tolist() for (t, i, _), s in zip(layers, stats)}
    assert sorted({t for t, _ in reached}) == ["text", "vision"]
    assert all(len(n) == 4 and min(n) > 0 for n in reached.values()), reached
    assert di <= 1e-6 and dt <= 1e-6, (di, dt)


def test_upcycle_default_router_init_preserves_function(dist1, dense_full):
    from trainer.models.state import load_full_state_dict
    from trainer.moe.upcycle import upcycle_state_dict

    full, (ref_i, ref_t), (images, text) = dense_full
    overrides = (tower_moe("vision", num_experts=4, every=1, top_k=1)
                 + tower_moe("text", num_experts=4, every=1, top_k=1))
    model, cfg = make_model(dist1, overrides, seed=14)
    # The default router init is a small normal: routing at step 0 spreads the tokens and the
    # default capacity (factor 2) keeps them all. (router_init=zeros ties every probability,
    # sends all tokens to one expert and drops half of them at this capacity.)
    assert cfg.model.vision.moe.router_init == "normal"
    # (It does not reach every expert: the small default router routes by what the tokens
    # share; measured text block 1: [23, 40, 8, 0]. test_upcycle_preserves_function does.)
    load_full_state_dict(model, upcycle_state_dict(full, cfg.model, seed=0), dist1)
    model.eval()
    with torch.no_grad():
        di = max_diff(model.encode_image(images), ref_i)
        dt = max_diff(model.encode_text(text), ref_t)
    stats = [mlp.pop_stats() for _, _, mlp in moe_layers(model)]
    assert len(stats) == 4
    assert all(int(s["routes_kept"]) == int(s["routes_wanted"]) for s in stats)  # no drop
    assert di <= 1e-6 and dt <= 1e-6, (di, dt)


def _direct_aux(x, wg, valid, k, name, threshold):
    """One aux loss of one layer from its input, written out (not trainer.moe.router)."""
    logits = x.double() @ wg.t()
    p = torch.softmax(logits, -1)
    chosen = torch.topk(p, k, dim=-1).indices
    v = valid.double()
    n = v.sum()
    e = p.shape[1]
    if name == "load_balance":
        picks = torch.zeros_like(p)
        for u in range(p.shape[0]):
            for j in range(k):
                picks[u, chosen[u, j]] += 1.0
        f = (picks * v[:, None]).sum(0) / (n * k)
        return e * (f * ((p * v[:, None]).sum(0) / n)).sum()
    if name == "z_loss":
        return ((logits.exp().sum(-1).log() ** 2) * v).sum() / n
    ent = -(p * p.log()).sum(-1)
    if name == "entropy_local":
        return (ent * v).sum() / n
    mean_p = (p * v[:, None]).sum(0) / n
    return torch.clamp(threshold + (mean_p * mean_p.log()).sum(), min=0.0)


@pytest.mark.parametrize("aux", AUX_NAMES + ("none",))
def test_aux_loss_gradient_reaches_router(dist1, aux):
    weight = 0.3
    weights = {f"aux.{n}": (weight if n == aux else 0.0) for n in AUX_NAMES}
    model, cfg = make_model(dist1, tower_moe(
        "text", num_experts=4, layers=[1], router_init="normal", router_init_std=0.5, top_k=2,
        **weights))
    (_, _, mlp), = moe_layers(model)
    model.train()
    store, handles = capture_inputs(model)
    images, text = peers.sample_inputs(n=4, seed=15)
    out = model(images, text)
    i, t, s = out["image_features"], out["text_features"], out["logit_scale"]
    for h in handles:
        h.remove()
    loss = ((i.sum() + t.sum() + s) * 0.0)
    loss.backward()
    grad = mlp.router.wg.weight.grad
    if aux == "none":
        assert grad is None or torch.count_nonzero(grad) == 0
        return
    assert grad is not None and torch.count_nonzero(grad) > 0
    (hidden, pm), = store[("text", 1)]
    x = hidden.reshape(-1, hidden.shape[-1])
    valid = pm.t().reshape(-1).bool()
    wg = mlp.router.wg.weight.detach().double().clone().requires_grad_(True)
    want = weight * _direct_aux(x, wg, valid, 2, aux, math.log(4))
    want.backward()
    scale = max(1.0, float(wg.grad.abs().max()))
    assert max_diff(grad, wg.grad) <= 1e-6 * scale, (max_diff(grad, wg.grad), scale)


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("overrides,needle", [
    (["model.text.moe.num_experts=4"], "model.text.moe.num_experts=4"),
    (["model.text.moe.num_experts=4", "model.text.moe.every=1", "model.text.moe.last=1"],
     "model.text.moe.num_experts=4"),
    (["model.text.moe.num_experts=4", "model.text.moe.every=1", "model.text.moe.top_k=3"],
     "model.text.moe.top_k=3"),
    (["model.text.moe.num_experts=4", "model.text.moe.every=1",
      "model.text.moe.routing=image"], "model.text.moe.routing"),
    (["model.vision.moe.num_experts=4", "model.vision.moe.every=1", "parallel.ep=3"],
     "model.vision.moe.num_experts=4 is not divisible by parallel.ep=3"),
    (["model.vision.moe.num_experts=4", "model.vision.moe.layers=[0, 2]"],
     "model.vision.moe.layers"),
    (["model.vision.moe.num_experts=4", "model.vision.moe.every=1",
      "model.vision.moe.expert_backend=triton"],
     "model.vision.moe.expert_backend='triton': expected one of auto, cuda, torch, reference"),
])
def test_moe_config_errors_name_the_key(overrides, needle):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)


def test_moe_config_valid():
    from trainer.config import load_config

    cfg = load_config(None, ["model.vision.moe.num_experts=4", "model.vision.moe.every=2",
                             "model.vision.moe.routing=image", "parallel.ep=2",
                             "model.text.moe.num_experts=2", "model.text.moe.last=1"])
    assert cfg.model.vision.moe.moe_layers(2) == [1]
    assert cfg.model.text.moe.moe_layers(2) == [1]


@pytest.mark.parametrize("noise", ["jitter", "rsample"])
def test_noisy_gate_only_in_training(noise):
    """Noise changes some training-time choices; evaluation routes by the clean argmax."""
    from trainer.moe.config import MoEConfig
    from trainer.moe.router import Router

    torch.manual_seed(0)
    router = Router(16, MoEConfig(num_experts=4, every=1, top_k=1, noisy_gate=noise,
                                  router_init="normal", router_init_std=1.0))
    x, valid = torch.randn(512, 16), torch.ones(512, dtype=torch.bool)
    clean = (x @ router.wg.weight.t()).argmax(-1)
    router.eval()
    assert torch.equal(router(x, valid)[0].experts[:, 0], clean)
    router.train()
    noisy = router(x, valid)[0].experts[:, 0]
    changed = int((noisy != clean).sum())
    assert 0 < changed < 512 // 2, changed
