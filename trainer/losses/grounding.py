"""CLOC's grounding loss (Chen et al. 2024, "Contrastive Localized Language-Image
Pre-Training", arXiv 2410.02746, Eq. 3): the prompter, prompted with a region caption's text
embedding, regresses that region's box (trainer/models/prompter.py ``RegionPrompter.ground``).

Per valid region (p predicted, t target, xyxy as fractions of the image; l1, giou, l2 the
weights ``l1_weight``, ``giou_weight``, ``l2_weight``):

    l1 * sum_k |p_k - t_k|  +  giou * (1 - GIoU(p, t))  +  l2 * mean_k (p_k - t_k)^2

then a proper global mean over the ``N`` valid regions of the data-parallel group, returned
as this rank's share (``sum_r * world / N``, the convention of trainer/losses/region.py: the
mean over ranks is the single-process loss on the concatenated batch). The paper's Eq. 3 is
the last term alone (a squared error averaged over the 4 coordinates; the extracted PDF text
reads ``1/(4MN) sum ||l - Head(z)||2``, which we read as squared); L1 + GIoU is DETR's box
loss (Carion et al. 2020, weights 5 and 2), the train.grounding_* defaults. GIoU: Rezatofighi
et al. 2019, with torchvision's ``eps`` in both denominators.
"""
from __future__ import annotations

import torch

from trainer.losses.gather import count_tensor, group_size, sum_over_group

EPS = 1e-7  # torchvision.ops.generalized_box_iou_loss's default


def box_iou_giou(a: torch.Tensor, b: torch.Tensor, eps: float = EPS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise IoU and generalised IoU of boxes ``a``, ``b`` ``[..., 4]`` xyxy (paired,
    not all-pairs). Returns two ``[...]`` tensors. A box with x1 < x0 (or y1 < y0) counts as
    empty."""
    def area(x):
        return (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)

    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:])
                - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)        # [..., 2]
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area(a) + area(b) - inter
    iou = inter / (union + eps)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:])
               - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)         # [..., 2]
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou, iou - (hull - union) / (hull + eps)


def grounding_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   l1_weight: float = 5.0, giou_weight: float = 2.0, l2_weight: float = 0.0,
                   group=None, valid_count: int | None = None) -> torch.Tensor:
    """``pred``, ``target`` ``[b, R, 4]`` xyxy in fractions of the image (padding slots may
    hold anything finite); ``mask [b, R]`` bool, True for real regions; ``group``: the
    data-parallel group (None: this batch only). Returns this rank's share of the global mean
    over valid regions (see the module docstring); an exact zero connected to the graph when
    no rank has a valid region. ``valid_count``: the valid regions of the whole group when the
    caller knows it (trainer/step.py's plan_regions); None: one tiny all-reduce of the count
    when ``group`` has >1 rank."""
    valid = mask.bool()
    dtype = torch.promote_types(pred.dtype, torch.float32)   # fp32 at least (bf16 models)
    pred, target = pred.to(dtype), target.to(dtype)
    diff = pred - target                                                      # [b, R, 4]
    per = l1_weight * diff.abs().sum(-1) + l2_weight * diff.square().mean(-1)  # [b, R]
    if giou_weight:
        per = per + giou_weight * (1.0 - box_iou_giou(pred, target)[1])
    total = (sum_over_group(valid.sum(), group).clamp(min=1).to(per.dtype) if valid_count is None
             else count_tensor(valid_count, per))
    return torch.where(valid, per, 0.0).sum() * group_size(group) / total
