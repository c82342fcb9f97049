"""CLOC region evaluation, as pure functions over every region of the eval set: region
retrieval (region embeddings, the prompter's output for an image and a box, against region
captions) and grounding accuracy (the box the prompter returns for a region caption against
the region's box).

    m = region_retrieval(region, region_text, region_text_ids)   # {"region_to_text_r1": ...}
    m = grounding_accuracy(pred_boxes, boxes)                    # {"grounding_acc50": ...}

Each present region is one query / gallery item (two boxes are two regions, even on one
image). Region captions that tokenise alike are one caption, which then describes every region
it was given to. Ranking, ties and the chance level are those of trainer/eval/retrieval.py:
region -> text asks for the region's caption among all distinct region captions, text ->
region for any region it describes among all regions.
"""
from __future__ import annotations

import torch

from trainer.eval.retrieval import DEFAULT_KS, dedup, paired_retrieval
from trainer.losses.grounding import box_iou_giou

GROUNDING_IOU = 0.5  # a box is found at IoU >= 0.5: the grounding benchmarks' Acc@0.5


def region_retrieval(region: torch.Tensor, region_text: torch.Tensor,
                     region_text_ids: torch.Tensor,
                     ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """``region``/``region_text`` ``[M, e]`` L2-normalised (present regions only),
    ``region_text_ids [M]``. Returns ``region_to_text_r{K}``, ``text_to_region_r{K}`` (+
    ``_chance``), ``regions`` and ``region_texts`` (distinct captions)."""
    if region.shape != region_text.shape or region_text_ids.shape != region.shape[:1]:
        raise ValueError(f"region {tuple(region.shape)}, region_text {tuple(region_text.shape)} "
                         f"and region_text_ids {tuple(region_text_ids.shape)} must describe the "
                         "same M regions")
    txt_inv, txt = dedup(region_text_ids, region_text)
    pairs = torch.stack([torch.arange(len(txt_inv)), txt_inv], 1)
    out = paired_retrieval(region.detach(), txt, pairs, ("region_to_text", "text_to_region"),
                           ks)
    out.update(regions=int(region.shape[0]), region_texts=len(txt))
    return out


def grounding_accuracy(pred: torch.Tensor, target: torch.Tensor,
                       threshold: float = GROUNDING_IOU) -> dict[str, float]:
    """``pred``/``target`` ``[M, 4]`` xyxy (the box each region caption located, the region's
    own box). Returns ``grounding_acc50`` (the fraction with IoU >= ``threshold``; the key
    names the default 0.5), ``grounding_miou`` (mean IoU) and ``grounding_regions`` (M)."""
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both "
                         "be [M, 4]")
    iou, _ = box_iou_giou(pred.detach().double(), target.detach().double(), eps=0.0)
    iou = torch.nan_to_num(iou, nan=0.0)  # two empty boxes: not a hit
    m = max(int(iou.shape[0]), 1)
    return {"grounding_acc50": float((iou >= threshold).sum()) / m,
            "grounding_miou": float(iou.sum()) / m, "grounding_regions": int(iou.shape[0])}
