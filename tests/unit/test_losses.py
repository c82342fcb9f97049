"""Training losses on one process (trainer/losses/); the global-batch versions are checked
under torchrun in tests/distributed/test_losses_dist.py.

Tolerances (measured in parentheses): against open_clip's ClipLoss / SigLipLoss in
float32, values and gradients <= 1e-5 absolute (clip: value 0, grads 1.2e-7; siglip: 0 and 0;
the same float32 expression, summed in another order); region loss against a float64
python-loop reference <= 1e-12 (value 0, grads 2.2e-16); masked-out slots change nothing:
exactly 0; torch.autograd.gradcheck in float64 at its defaults (eps 1e-6, atol 1e-5,
rtol 1e-3).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from trainer.losses import clip_loss, region_text_loss, siglip_loss

F32_TOL = 1e-5
F64_TOL = 1e-12


def features(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)
    return x.requires_grad_()


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def max_err(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_clip_loss_matches_open_clip():
    img, txt = features(8, 16, seed=1), features(8, 16, seed=2)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    ours = clip_loss(img, txt, scale)
    ref = ClipLoss()(img, txt, scale)
    value, grad = abs(val(ours - ref)), max_err(grads(ours, img, txt, scale),
                                                  grads(ref, img, txt, scale))
    print(f"clip vs open_clip: value {value:.2e} grad {grad:.2e}")
    assert value <= F32_TOL and grad <= F32_TOL


def test_siglip_loss_matches_open_clip():
    img, txt = features(8, 16, seed=3), features(8, 16, seed=4)
    scale = torch.tensor(10.0, requires_grad=True)   # t' = log 10
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = siglip_loss(img, txt, scale, bias)
    ref = SigLipLoss(rank=0, world_size=1)(img, txt, scale, bias)
    value = abs(val(ours - ref))
    grad = max_err(grads(ours, img, txt, scale, bias), grads(ref, img, txt, scale, bias))
    print(f"siglip vs open_clip: value {value:.2e} (loss {val(ref):.3f}) grad {grad:.2e}")
    assert value <= F32_TOL * max(1.0, abs(val(ref))) and grad <= F32_TOL


def region_reference(reg, txt, mask, scale) -> torch.Tensor:
    """Explicit per-row softmax over the valid slots, one row at a time."""
    valid = [(i, k) for i in range(mask.shape[0]) for k in range(mask.shape[1]) if mask[i, k]]
    if not valid:
        return torch.zeros((), dtype=reg.dtype)
    total = torch.zeros((), dtype=reg.dtype)
    for queries, keys in ((reg, txt), (txt, reg)):
        for a in valid:
            logits = torch.stack([scale * (queries[a] @ keys[c]) for c in valid])
            total = total - torch.log(torch.exp(logits[valid.index(a)]) / torch.exp(logits).sum())
    return 0.5 * total / len(valid)


def region_case(b=3, r=4, e=8, seed=5):
    reg = features(b, r, e, dtype=torch.float64, seed=seed)
    txt = features(b, r, e, dtype=torch.float64, seed=seed + 1)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)[:b, :r]
    return reg, txt, mask, torch.tensor(7.0, dtype=torch.float64, requires_grad=True)


def test_region_loss_matches_loop_reference():
    reg, txt, mask, scale = region_case()
    ours = region_text_loss(reg, txt, mask, scale)
    ref = region_reference(reg, txt, mask, scale)
    value = abs(val(ours - ref))
    grad = max_err(grads(ours, reg, txt, scale), grads(ref, reg, txt, scale))
    print(f"region vs loop reference: value {value:.2e} grad {grad:.2e}")
    assert value <= F64_TOL and grad <= F64_TOL


def test_region_loss_ignores_masked_slots():
    reg, txt, mask, scale = region_case()
    base = region_text_loss(reg, txt, mask, scale)
    g_base = grads(base, reg, txt)
    reg2, txt2 = reg.detach().clone(), txt.detach().clone()
    reg2[~mask] = 123.0      # garbage in every padding slot, finite
    txt2[~mask] = -7.0
    reg2.requires_grad_(), txt2.requires_grad_()
    other = region_text_loss(reg2, txt2, mask, scale)
    assert val(other) == val(base)
    g_other = grads(other, reg2, txt2)
    assert max_err(g_base, g_other) == 0.0
    assert float(g_other[0][~mask].abs().max()) == 0.0   # padding slots get no gradient


def test_region_loss_zero_valid_is_connected_zero():
    reg, txt, _, scale = region_case()
    loss = region_text_loss(reg, txt, torch.zeros(3, 4, dtype=torch.bool), scale)
    assert val(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(reg.grad.abs().max()) == 0.0 and torch.isfinite(scale.grad)


def test_region_loss_single_valid_region():
    reg, txt, _, scale = region_case()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = True
    assert abs(val(region_text_loss(reg, txt, mask, scale))) <= F64_TOL  # log(1) = 0


@pytest.mark.parametrize("name", ["clip", "siglip", "region"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(11)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    def scalar(v):
        return torch.tensor(v, dtype=torch.float64, requires_grad=True)

    if name == "clip":
        inputs, fn = (leaf(4, 3), leaf(4, 3), scalar(2.0)), clip_loss
    elif name == "siglip":
        inputs, fn = (leaf(4, 3), leaf(4, 3), scalar(2.0), scalar(-1.0)), siglip_loss
    else:
        mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
        inputs = (leaf(3, 3, 4), leaf(3, 3, 4), scalar(2.0))

        def fn(reg, txt, scale):
            return region_text_loss(reg, txt, mask, scale)
    assert torch.autograd.gradcheck(fn, inputs)


def test_clip_loss_value_at_uniform_logits():
    """With identical features every logit ties: the loss is log(b)."""
    x = F.normalize(torch.ones(5, 4), dim=-1)
    assert abs(float(clip_loss(x, x, torch.tensor(3.0))) - math.log(5)) <= F32_TOL
