"""CLIP's symmetric InfoNCE loss over one (micro)batch of paired features.

The global-batch version (features gathered over data-parallel ranks) arrives with the
training issue; this one is exact for a single rank's batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """``image_features``, ``text_features``: ``[b, e]`` L2-normalised; ``logit_scale``: exp'd."""
    logits = logit_scale * image_features @ text_features.t()  # [b, b]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
