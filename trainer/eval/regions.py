"""CLOC region retrieval: region embeddings (the prompter's output for an image and a box)
against region captions, over every region of the eval set, as a pure function.

    m = region_retrieval(region, region_text, region_text_ids)   # {"region_to_text_r1": ...}

Each present region is one query / gallery item (two boxes are two regions, even on one
image). Region captions that tokenise alike are one caption, which then describes every region
it was given to. Ranking, ties and the chance level are those of trainer/eval/retrieval.py:
region -> text asks for the region's caption among all distinct region captions, text ->
region for any region it describes among all regions.
"""
from __future__ import annotations

import torch

from trainer.eval.retrieval import DEFAULT_KS, dedup, paired_retrieval


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
