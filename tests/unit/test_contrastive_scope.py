"""``train.contrastive_scope: step`` (trainer/step_cache.py) in one process (the 2-rank DP and
PP=2 checks: tests/distributed/check_parallel.py), tiny CLIP:

- 4 micro-batches of 2 at ``step`` scope = 1 micro-batch of 8 at ``microbatch`` scope, for
  CLIP and SigLIP, and with CLOC's region loss. Float64 weights and inputs: loss and every
  parameter gradient within 1e-6 relative (per-tensor L2, floored at 1e-8 of the whole
  gradient's norm for exactly-zero gradients such as attention key biases; measured <= 1.5e-7: the losses and
  megatron's attention softmax still run in fp32). fp32: loss within 1e-6 relative, the whole
  gradient within 3e-6 relative (global L2) -- that is fp32's floor here: the one big
  micro-batch's own fp32 gradient is 1.9e-6 from its float64 one; measured 1.2e-6;
- MoE: the router aux losses are counted once per micro-batch, as at ``microbatch`` scope
  (the aux part of the gradient, with aux on minus aux off, is the same at both scopes within
  1e-6 relative), and the routing statistics count one forward per micro-batch;
- noisy gating (jitter on the router input, Gumbel on the choice): the second forward
  replays the first's noise, so ``step`` scope with one micro-batch equals ``microbatch``
  scope from the same RNG state (1e-6 relative);
- the metrics are those of the step loss.
"""
import pytest
import torch

import peers

B, M = 2, 4


def cfg_of(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", "train.precision=fp32",
                              *overrides])


def build(layout, cfg, seed=0, dtype=torch.float32):
    from trainer.distributed.grads import wrap_ddp
    from trainer.models.build import build_for_training

    torch.manual_seed(seed)
    return wrap_ddp(build_for_training(cfg, layout).to(dtype))


def microbatches(n_per, count, regions=False, seed=1, dtype=torch.float32):
    images, text = peers.sample_inputs(n=n_per * count, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(count):
        sl = slice(i * n_per, (i + 1) * n_per)
        mb = {"images": images[sl], "text": text[sl], "size": n_per}
        if regions:
            lo = torch.rand(n_per, 2, 2, generator=g) * 0.5
            mb["region_boxes"] = torch.cat([lo, lo + 0.4], dim=-1)            # [b, R, 4]
            mb["region_text"] = text[sl, None].expand(n_per, 2, -1).flip(0).contiguous()
            mb["region_mask"] = torch.rand(n_per, 2, generator=g) > 0.3
        out.append({k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in mb.items()})
    return out


def merged(mbs):
    out = {k: torch.cat([m[k] for m in mbs]) for k in mbs[0] if k != "size"}
    out["size"] = sum(m["size"] for m in mbs)
    return [out]


def loss_and_grads(ddp, mbs, cfg, rng_seed=7):
    from trainer.distributed.grads import unwrap
    from trainer.step import forward_backward

    model = unwrap(ddp)
    ddp.zero_grad_buffer()
    torch.manual_seed(rng_seed)
    out = forward_backward(ddp, mbs, cfg)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}
    ddp.zero_grad_buffer()
    return out, grads


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def global_rel(a, b):
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


def assert_close(got, want, tol=1e-6, grad_tol=None):
    """Loss within ``tol`` relative; every gradient tensor within ``tol`` (per-tensor), or the
    whole gradient within ``grad_tol`` (global) when given."""
    (lg, gg), (lw, gw) = got, want
    assert abs(lg["loss"] - lw["loss"]) <= tol * abs(lw["loss"]), (lg, lw)
    assert set(gg) == set(gw)
    assert any(float(g.abs().max()) > 0 for g in gw.values())
    if grad_tol is not None:
        assert global_rel(gg, gw) <= grad_tol, global_rel(gg, gw)
        return
    # per tensor, relative to max(its norm, 1e-8 x the whole gradient's): a key bias has an
    # exactly-zero true gradient (softmax ignores it), ~1e-18 of rounding on either side
    floor = 1e-8 * sum(float(g.double().pow(2).sum()) for g in gw.values()) ** 0.5
    err = {k: float((gg[k].double() - gw[k].double()).norm())
           / max(float(gw[k].double().norm()), floor) for k in gw}
    worst = max(err, key=err.get)
    assert err[worst] <= tol, (worst, err[worst])


@pytest.mark.parametrize("extra", [
    [],
    ["train.loss=siglip", "model.logit_bias_init=-10", "model.logit_scale_init=2.302585"],
    ["model.prompter.layers=1", "train.region_loss_weight=0.5"],
])
def test_step_scope_equals_one_big_microbatch(dist1, extra):
    regions = "train.region_loss_weight=0.5" in extra
    mbs = microbatches(B, M, regions=regions, dtype=torch.float64)
    big = cfg_of(*extra)
    step = cfg_of(*extra, "train.contrastive_scope=step")
    ddp = build(dist1, big, dtype=torch.float64)
    want = loss_and_grads(ddp, merged(mbs), big)
    got = loss_and_grads(ddp, mbs, step)
    assert_close(got, want)
    if regions:
        assert abs(got[0]["region_loss"] - want[0]["region_loss"]) <= 1e-6 * want[0]["region_loss"]
    # and the microbatch scope really differs (fewer negatives per loss)
    per_mb = loss_and_grads(ddp, mbs, big)
    assert abs(per_mb[0]["loss"] - want[0]["loss"]) > 1e-3


def test_step_scope_fp32(dist1):
    mbs = microbatches(B, M)
    big, step = cfg_of(), cfg_of("train.contrastive_scope=step")
    ddp = build(dist1, big)
    assert_close(loss_and_grads(ddp, mbs, step), loss_and_grads(ddp, merged(mbs), big),
                 grad_tol=3e-6)


def moe_cfg(*extra):
    over = []
    for tower in ("vision", "text"):
        over += [f"model.{tower}.moe.num_experts=4", f"model.{tower}.moe.every=1",
                 f"model.{tower}.moe.top_k=2", f"model.{tower}.moe.router_init_std=0.5",
                 f"model.{tower}.moe.capacity_factor=1.0",
                 f"model.{tower}.moe.aux.z_loss=0.01"]
    return cfg_of(*over, *extra)


def test_moe_aux_losses_once_per_microbatch(dist1):
    from trainer.distributed.grads import unwrap
    from trainer.moe.layer import moe_mlps

    mbs = microbatches(B, M)
    aux = "model.{}.moe.aux.load_balance={}"
    on = [aux.format(t, 0.5) for t in ("vision", "text")]
    off = [aux.format(t, 0.0) for t in ("vision", "text")] + [
        f"model.{t}.moe.aux.z_loss=0.0" for t in ("vision", "text")]
    ddp = build(dist1, moe_cfg(*on))
    layers = moe_mlps(unwrap(ddp))
    parts = {}
    for scope in ("microbatch", "step"):
        for name, over in (("on", on), ("off", off)):
            cfg = moe_cfg(*over, f"train.contrastive_scope={scope}")
            for mlp in layers:
                mlp.cfg.aux = cfg.model.vision.moe.aux   # the same aux weights in every layer
                mlp.pop_stats()
            parts[scope, name] = loss_and_grads(ddp, mbs, cfg)[1]
            calls = {int(mlp.pop_stats()["calls"]) for mlp in layers}
            assert calls == {M}, (scope, name, calls)  # one forward per micro-batch counted
    for k in parts["step", "on"]:
        want = parts["microbatch", "on"][k] - parts["microbatch", "off"][k]
        got = parts["step", "on"][k] - parts["step", "off"][k]
        if want.abs().max() > 0:
            assert rel(got, want) <= 1e-5, (k, rel(got, want))
    routers = [k for k in parts["step", "on"] if "gate" in k]
    assert routers and all(not torch.equal(parts["microbatch", "on"][k],
                                           parts["microbatch", "off"][k]) for k in routers)


@pytest.mark.parametrize("noise", ["jitter", "rsample"])
def test_noisy_gating_is_replayed(dist1, noise):
    mbs = merged(microbatches(B, M))
    over = [f"model.{t}.moe.noisy_gate={noise}" for t in ("vision", "text")]
    ddp = build(dist1, moe_cfg(*over))
    want = loss_and_grads(ddp, mbs, moe_cfg(*over), rng_seed=11)
    got = loss_and_grads(ddp, mbs, moe_cfg(*over, "train.contrastive_scope=step"), rng_seed=11)
    assert_close(got, want)
    other = loss_and_grads(ddp, mbs, moe_cfg(*over), rng_seed=12)   # the noise matters
    assert abs(other[0]["loss"] - want[0]["loss"]) > 1e-7


def test_scope_is_validated():
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.contrastive_scope='global'"):
        cfg_of("train.contrastive_scope=global")
