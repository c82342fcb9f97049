"""CLOC's region-text contrastive loss (Chen et al. 2024, "Contrastive Localized
Language-Image Pre-Training") over the global batch.

Symmetric InfoNCE between region embeddings (the prompter's output for a box) and the
embeddings of their region captions. Every valid region of every rank is a negative for every
other region: the ``[b, R]`` slots are flattened to ``b*R`` rows, gathered over the group
(shapes are fixed, so padding slots travel too), and invalid columns are masked out with a
large finite negative (``-inf`` would give NaN gradients in all-masked rows).

Normalisation is a proper global mean over the ``N`` valid regions of the whole group, however
they are spread over ranks: rank ``r`` with ``n_r`` valid rows returns
``mean_r * n_r * world / N`` (``mean_r`` its mean over valid rows), written below as
``sum_r * world / N``, so the mean over ranks is ``sum over all valid rows / N``, the
single-process loss on the concatenated batch. ``N`` comes from the gathered mask (no extra
collective, no gradient). With ``N = 0`` the loss is an exact zero still connected to the
graph, so every rank runs backward (the gather's backward is a collective).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.gather import all_gather_with_grad, group_rank, group_size

_IGNORE = -100  # cross_entropy's ignore_index, for padding rows


def region_text_loss(region_features: torch.Tensor, region_text_features: torch.Tensor,
                     region_mask: torch.Tensor, logit_scale: torch.Tensor,
                     group=None) -> torch.Tensor:
    """``region_features``, ``region_text_features``: ``[b, R, e]``, L2-normalised by the
    caller (trainer/models/clip.py), slot ``[i, k]`` of one paired with slot ``[i, k]`` of
    the other; ``region_mask``: ``[b, R]`` bool, True for real regions (padding slots may hold
    anything finite); ``logit_scale``: already exp'd; ``group``: the data-parallel group
    (None: this batch only; b and R must be equal on all ranks). Returns this rank's share of
    the global mean (see the module docstring)."""
    b, r, e = region_features.shape
    n = b * r
    mask = region_mask.reshape(n).bool()                                            # [n]
    # one collective for regions, captions and mask: [n, 2e+1] -> [world*n, 2e+1]
    packed = torch.cat([region_features.reshape(n, e), region_text_features.reshape(n, e),
                        mask.to(region_features.dtype)[:, None]], dim=-1)
    gathered = all_gather_with_grad(packed, group)
    all_regions, all_texts, all_mask = gathered.split([e, e, 1], dim=-1)
    all_mask = all_mask.detach().squeeze(-1) > 0.5                                  # [world*n]
    total_valid = all_mask.sum().clamp(min=1).to(region_features.dtype)

    regions = region_features.reshape(n, e)
    texts = region_text_features.reshape(n, e)
    masked = torch.finfo(region_features.dtype).min / 2
    logits_per_region = (logit_scale * regions @ all_texts.t()).masked_fill(~all_mask, masked)
    logits_per_text = (logit_scale * texts @ all_regions.t()).masked_fill(~all_mask, masked)
    # [n, world*n] each; a padding row's label is ignored, so its masked target never counts
    labels = torch.arange(n, device=mask.device) + group_rank(group) * n
    labels = labels.masked_fill(~mask, _IGNORE)
    summed = (F.cross_entropy(logits_per_region, labels, ignore_index=_IGNORE, reduction="sum")
              + F.cross_entropy(logits_per_text, labels, ignore_index=_IGNORE, reduction="sum"))
    return 0.5 * summed * group_size(group) / total_valid
