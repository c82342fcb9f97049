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

Duplicate captions (given ``region_text_ids``): detector labels repeat ("a person"), and two
regions captioned alike are not negatives of each other. A column whose caption has the same
token ids as the row's caption, other than the row's own positive, leaves the softmax
denominator in both directions. The ids are gathered too (one more all-gather, no gradient)
and compared exactly (``torch.unique`` over the gathered rows). CLOC (Sec. 3.4) drops the pairs
whose caption embeddings have cosine > 0.9; identical token ids are the exact subset of that
rule that needs no threshold (ours).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.gather import (all_gather_no_grad, all_gather_with_grad, count_tensor,
                                   group_rank, group_size)

_IGNORE = -100  # cross_entropy's ignore_index, for padding rows


def region_text_loss(region_features: torch.Tensor, region_text_features: torch.Tensor,
                     region_mask: torch.Tensor, logit_scale: torch.Tensor,
                     group=None, region_text_ids: torch.Tensor | None = None,
                     valid_count: int | None = None) -> torch.Tensor:
    """``region_features``, ``region_text_features``: ``[b, R, e]``, L2-normalised by the
    caller (trainer/models/clip.py), slot ``[i, k]`` of one paired with slot ``[i, k]`` of
    the other; ``region_mask``: ``[b, R]`` bool, True for real regions (padding slots may hold
    anything finite); ``logit_scale``: already exp'd; ``group``: the data-parallel group
    (None: this batch only; b and R must be equal on all ranks); ``region_text_ids``: ``[b, R,
    L]`` the captions' token ids (None: every other region is a negative); ``valid_count``:
    the valid regions of the whole group when the caller knows it (trainer/step.py's
    plan_regions; None: counted from the gathered mask). Returns this rank's share of the
    global mean (see the module docstring)."""
    b, r, e = region_features.shape
    n = b * r
    mask = region_mask.reshape(n).bool()                                            # [n]
    # one collective for regions, captions and mask: [n, 2e+1] -> [world*n, 2e+1]
    packed = torch.cat([region_features.reshape(n, e), region_text_features.reshape(n, e),
                        mask.to(region_features.dtype)[:, None]], dim=-1)
    gathered = all_gather_with_grad(packed, group)
    all_regions, all_texts, all_mask = gathered.split([e, e, 1], dim=-1)
    all_mask = all_mask.detach().squeeze(-1) > 0.5                                  # [world*n]
    total_valid = (all_mask.sum().clamp(min=1).to(region_features.dtype) if valid_count is None
                   else count_tensor(valid_count, region_features))

    regions = region_features.reshape(n, e)
    texts = region_text_features.reshape(n, e)
    masked = torch.finfo(region_features.dtype).min / 2
    logits_per_region = (logit_scale * regions @ all_texts.t()).masked_fill(~all_mask, masked)
    logits_per_text = (logit_scale * texts @ all_regions.t()).masked_fill(~all_mask, masked)
    # [n, world*n] each; a padding row's label is ignored, so its masked target never counts
    labels = torch.arange(n, device=mask.device) + group_rank(group) * n
    if region_text_ids is not None:
        same = same_caption(region_text_ids.reshape(n, -1), labels, group)          # [n, world*n]
        logits_per_region = logits_per_region.masked_fill(same, masked)
        logits_per_text = logits_per_text.masked_fill(same, masked)
    labels = labels.masked_fill(~mask, _IGNORE)
    summed = (F.cross_entropy(logits_per_region, labels, ignore_index=_IGNORE, reduction="sum")
              + F.cross_entropy(logits_per_text, labels, ignore_index=_IGNORE, reduction="sum"))
    return 0.5 * summed * group_size(group) / total_valid


def same_caption(ids: torch.Tensor, rows: torch.Tensor, group=None) -> torch.Tensor:
    """``ids [n, L]`` this rank's captions' token ids, ``rows [n]`` their row indices in the
    gathered batch -> ``[n, world*n]`` bool: True where a gathered caption equals row ``i``'s
    caption and is not row ``i`` itself (its positive)."""
    all_ids = all_gather_no_grad(ids.to(torch.int32), group)                       # [world*n, L]
    _, caption = torch.unique(all_ids, dim=0, return_inverse=True)                 # [world*n]
    same = caption[rows][:, None] == caption[None, :]                              # [n, world*n]
    return same.scatter(1, rows[:, None], False)
