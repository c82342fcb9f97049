"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training") over the global batch.

Every (image, text) pair is an independent binary problem: label +1 on the diagonal, -1
elsewhere, loss ``-log sigmoid(label * (t * <x, y> + bias))`` summed over pairs and divided by
the batch size (the paper's and open_clip's ``SigLipLoss`` normalisation). Across ranks, each
rank scores its ``b`` local images against all ``world*b`` gathered texts (gathered with grad,
trainer/losses/gather.py): the sum over pairs / ``b``, averaged over ranks, is the sum over
all global pairs / ``world*b``, i.e. the single-process loss on the global batch.

Initialisation (the paper, section 3.1): ``t = exp(t')`` with ``t' = log 10`` and ``b = -10``,
i.e. ``model.logit_scale_init=2.302585`` (the log, exp'd by the model) and
``model.logit_bias_init=-10``. With CLIP's init (``t' = log(1/0.07)``, no bias) the many
negatives dominate the first steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.losses.gather import all_gather_with_grad, group_rank


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                group=None) -> torch.Tensor:
    """``image_features``, ``text_features``: ``[b, e]`` L2-normalised by the caller, pair i
    is row i; ``logit_scale``: already exp'd; ``logit_bias``: a scalar tensor; ``group``: the
    data-parallel group (None: this batch only). Returns this rank's local loss."""
    b = image_features.shape[0]
    all_text = all_gather_with_grad(text_features, group)                  # [world*b, e]
    logits = logit_scale * image_features @ all_text.t() + logit_bias      # [b, world*b]
    # +1 for this rank's own pairs, -1 for every other pair
    labels = -torch.ones_like(logits)
    own = torch.arange(b, device=logits.device)
    labels[own, own + group_rank(group) * b] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b
