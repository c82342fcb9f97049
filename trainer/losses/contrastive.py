"""CLIP's symmetric InfoNCE loss (Radford et al. 2021) over the global batch.

Local-loss style (open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``): each rank
scores its own ``b`` rows against the ``world*b`` gathered columns, so the logits are
``[b, world*b]`` instead of ``[world*b, world*b]``. The mean over ranks of the local losses
is the single-process loss on the concatenated global batch, and with the gather's gradient
convention (trainer/losses/gather.py: reduce-scatter SUM, data-parallel sync AVERAGES) so are
the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.gather import all_gather_with_grad, group_rank


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, group=None) -> torch.Tensor:
    """``image_features``, ``text_features``: ``[b, e]`` L2-normalised by the caller, pair i
    is row i; ``logit_scale``: already exp'd (a tensor with grad); ``group``: the
    data-parallel group whose ranks' rows are the negatives (None: this batch only).
    Returns this rank's local loss; its mean over the group is the global-batch loss."""
    b = image_features.shape[0]
    # one collective for both towers: [b, 2e] -> [world*b, 2e]
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=-1), group)
    all_image, all_text = both.split([image_features.shape[-1], text_features.shape[-1]], dim=-1)
    logits_per_image = logit_scale * image_features @ all_text.t()  # [b, world*b]
    logits_per_text = logit_scale * text_features @ all_image.t()   # [b, world*b]
    labels = torch.arange(b, device=logits_per_image.device) + group_rank(group) * b
    return 0.5 * (F.cross_entropy(logits_per_image, labels)
                  + F.cross_entropy(logits_per_text, labels))
