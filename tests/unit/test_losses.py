"""Training losses on one process (trainer/losses/); the global-batch versions are checked
under torchrun in tests/distributed/test_losses_dist.py.

Tolerances (measured in parentheses): against open_clip's ClipLoss / SigLipLoss in
float32, values and gradients <= 1e-5 absolute (clip: value 0, grads 1.2e-7; siglip: 0 and 0;
the same float32 expression, summed in another order); region loss against a float64
python-loop reference <= 1e-12 (value 0, grads 2.2e-16), with repeated captions (CLOC's
dedupe) too (8.9e-16, 2.2e-16); grounding loss against a plain-Python float64 formula <= 1e-12
(<= 4.4e-16; float32 inputs within 1e-5 relative: 9.3e-7) and torchvision's
generalized_box_iou_loss as the GIoU peer (1e-12); masked-out slots change nothing:
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


# ------------------------------------------------------------------ region captions repeated

def region_reference_dedupe(reg, txt, mask, scale, ids) -> torch.Tensor:
    """The loop reference with CLOC's rule: a column whose caption (token ids) equals the
    row's caption, other than the row's own pair, is left out of the row's denominator."""
    valid = [(i, k) for i in range(mask.shape[0]) for k in range(mask.shape[1]) if mask[i, k]]
    total = torch.zeros((), dtype=reg.dtype)
    for queries, keys in ((reg, txt), (txt, reg)):
        for a in valid:
            cols = [c for c in valid if c == a or not torch.equal(ids[c], ids[a])]
            logits = torch.stack([scale * (queries[a] @ keys[c]) for c in cols])
            total = total - (logits[cols.index(a)] - torch.logsumexp(logits, 0))
    return 0.5 * total / max(len(valid), 1)


def caption_ids(b=3, r=4, length=5):
    """[b, r, L] token ids: slots (0,0), (0,3), (2,0) share caption A, (0,1) and (2,2) share
    caption B (B differs from A in its last token only), the rest are distinct; the padding
    slots repeat A too (they must not matter)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (b, r, length), generator=g)
    a, bb = ids[0, 0].clone(), ids[0, 0].clone()
    bb[-1] += 1
    for i, k in ((0, 3), (2, 0), (1, 1), (0, 2)):   # (1, 1) and (0, 2) are padding slots
        ids[i, k] = a
    ids[0, 1], ids[2, 2] = bb, bb
    return ids


def test_region_loss_duplicate_captions_are_not_negatives():
    reg, txt, mask, scale = region_case()
    ids = caption_ids()
    ours = region_text_loss(reg, txt, mask, scale, region_text_ids=ids)
    ref = region_reference_dedupe(reg, txt, mask, scale, ids)
    value = abs(val(ours - ref))
    grad = max_err(grads(ours, reg, txt, scale), grads(ref, reg, txt, scale))
    plain = region_text_loss(reg, txt, mask, scale)
    print(f"dedupe vs loop reference: value {value:.2e} grad {grad:.2e}; "
          f"with duplicates as negatives {val(plain):.4f} vs {val(ours):.4f}")
    assert value <= F64_TOL and grad <= F64_TOL
    assert val(plain) - val(ours) > 1e-3        # the repeats really were negatives before
    # all captions distinct: the same loss as without ids, bit for bit
    distinct = torch.arange(3 * 4 * 5).view(3, 4, 5)
    assert val(region_text_loss(reg, txt, mask, scale, region_text_ids=distinct)) == val(plain)
    # every valid caption alike: each row keeps only its positive, loss exactly 0
    same = torch.zeros(3, 4, 5, dtype=torch.long)
    assert val(region_text_loss(reg, txt, mask, scale, region_text_ids=same)) == 0.0


def test_region_loss_dedupe_gradcheck():
    g = torch.Generator().manual_seed(12)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    ids = torch.tensor([[[1], [2], [1]], [[9], [2], [9]], [[3], [1], [4]]])
    inputs = (torch.randn(3, 3, 4, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(3, 3, 4, generator=g, dtype=torch.float64).requires_grad_(),
              torch.tensor(2.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda reg, txt, s: region_text_loss(reg, txt, mask, s, region_text_ids=ids), inputs)


# ------------------------------------------------------------------ grounding (CLOC Eq. 3)

def giou_direct(p: list[float], t: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two xyxy boxes in plain Python floats (float64), torchvision's eps."""
    eps = 1e-7
    area = lambda b: max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)  # noqa: E731
    iw = max(min(p[2], t[2]) - max(p[0], t[0]), 0.0)
    ih = max(min(p[3], t[3]) - max(p[1], t[1]), 0.0)
    inter = iw * ih
    union = area(p) + area(t) - inter
    hull = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1]))
    iou = inter / (union + eps)
    return iou, iou - (hull - union) / (hull + eps)


def grounding_direct(pred, target, mask, w1, wg, w2) -> float:
    rows = [(i, k) for i in range(mask.shape[0]) for k in range(mask.shape[1]) if mask[i, k]]
    total = 0.0
    for i, k in rows:
        p, t = pred[i, k].tolist(), target[i, k].tolist()
        l1 = sum(abs(a - b) for a, b in zip(p, t))
        l2 = sum((a - b) ** 2 for a, b in zip(p, t)) / 4
        total += w1 * l1 + wg * (1 - giou_direct(p, t)[1]) + w2 * l2
    return total / max(len(rows), 1)


def box_case(b=3, r=4, seed=7):
    g = torch.Generator().manual_seed(seed)

    def boxes():
        lo, size = torch.rand(b, r, 2, generator=g, dtype=torch.float64) * 0.7, \
            0.05 + 0.3 * torch.rand(b, r, 2, generator=g, dtype=torch.float64)
        return torch.cat([lo, lo + size], -1)
    pred, target = boxes(), boxes()
    target[0, 0] = pred[0, 0]                       # a perfect hit: loss 0 on that region
    target[1, 0] = pred[1, 0] + torch.tensor([0.9, 0.9, 0.9, 0.9], dtype=torch.float64)  # apart
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    pred[~mask] = 55.0                               # finite garbage in padding slots
    return pred.requires_grad_(), target, mask


@pytest.mark.parametrize("weights", [(5.0, 2.0, 0.0), (0.0, 0.0, 1.0), (1.5, 0.7, 3.0)])
def test_grounding_loss_matches_direct_formula(weights):
    from torchvision.ops import generalized_box_iou_loss

    from trainer.losses import grounding_loss
    pred, target, mask = box_case()
    ours = grounding_loss(pred.float(), target.float(), mask, *weights)   # the training dtype
    ours64 = grounding_loss(pred, target, mask, *weights)
    ref = grounding_direct(pred.detach(), target, mask, *weights)
    print(f"grounding {weights}: float64 {abs(val(ours64) - ref):.2e}, "
          f"float32 {abs(val(ours) - ref):.2e} (loss {ref:.4f})")
    assert abs(val(ours64) - ref) <= F64_TOL
    assert abs(val(ours) - ref) <= 1e-5 * max(1.0, ref)
    # the peer: torchvision's GIoU loss (float64), L1 / L2 by torch
    p, t = pred.detach()[mask], target[mask]
    peer = (weights[0] * (p - t).abs().sum(-1)
            + weights[1] * generalized_box_iou_loss(p.double(), t, reduction="none")
            + weights[2] * (p - t).square().mean(-1)).mean()
    assert abs(float(peer) - ref) <= F64_TOL


def test_grounding_loss_grads_and_empty():
    from trainer.losses import box_iou_giou, grounding_loss
    pred, target, mask = box_case()
    moved = (pred.detach() + 0.013).requires_grad_()     # off the |x| and min/max kinks
    assert torch.autograd.gradcheck(
        lambda p: grounding_loss(p, target, mask, 1.0, 1.0, 1.0), (moved,))
    loss = grounding_loss(pred, target, mask, 1.0, 1.0, 1.0)
    (g,) = grads(loss, pred)
    assert float(g[~mask].abs().max()) == 0.0 and float(g[mask].abs().max()) > 0
    iou, giou = box_iou_giou(pred.detach()[0, 0], target[0, 0], eps=0.0)
    assert float(iou) == 1.0 and float(giou) == 1.0
    iou, giou = box_iou_giou(pred.detach()[1, 0], target[1, 0])
    assert float(iou) == 0.0 and float(giou) < 0                 # disjoint: GIoU below 0
    none = grounding_loss(pred, target, torch.zeros(3, 4, dtype=torch.bool))
    assert val(none) == 0.0 and none.requires_grad
