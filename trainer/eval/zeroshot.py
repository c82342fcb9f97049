"""Zero-shot classification: class-name prompts through the text tower give one classifier
row per class (templates averaged, as in CLIP); an image is assigned the class whose row is
closest to its embedding.

    w = classifier(model.encode_text, tokenizer, names, templates)   # [e, C]
    m = zero_shot_topk(image_embeddings, labels, w)                  # pure
    acc = zero_shot_accuracy(ddp_model, cfg, layout, tokenizer)      # collective; every rank

Samples with label -1 are not counted. Chance level: top-1 1/C, top-5 5/C (uniform classes).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.config import Config
from trainer.eval.prompts import prompt_tokens

log = logging.getLogger("upclip")


def class_names(cfg: Config) -> list[str]:
    """The eval set's class names in label order (trainer/eval/names.py)."""
    from trainer.eval.names import class_names as resolve

    return resolve(cfg)


@torch.no_grad()
def classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer, names: list[str],
               templates: list[str], device: torch.device | str | None = None,
               chunk: int = 256) -> torch.Tensor:
    """``[e, C]``: per class, the normalised mean of its normalised prompt embeddings.
    ``encode_text``: tokens ``[n, L]`` on ``device`` -> ``[n, e]`` (this repo's CLIP runs its
    text tower, on the last pipeline stage only: a collective there when text MoE layers
    exchange tokens).

    The prompts (tokenised once per tokenizer and set: ``prompts.prompt_tokens``) go through
    ``encode_text`` ``chunk`` at a time; a class's mean is taken as soon as all its templates
    are encoded, so about two chunks' prompt embeddings (< ``2*chunk + T`` rows) are held
    besides the ``[C, e]`` result, never all ``C*T``. Equal (``==``) on CPU to averaging all
    ``[C, T, e]`` at once: the same encoder batches (their size changes the text tower's bits)
    and the same mean over each class's templates (an fp64 mean would differ by ~6e-8)."""
    tokens = prompt_tokens(tokenizer, names, templates)                      # [C*T, L] int32
    n_templates = len(templates)
    weights, carry, done = None, None, 0
    for i in range(0, len(tokens), chunk):
        emb = encode_text(tokens[i:i + chunk].to(device=device, dtype=torch.long))   # [n, e]
        emb = F.normalize(emb.float(), dim=-1)
        if carry is not None:
            emb = torch.cat([carry, emb])                        # [r + n, e]: r < T carried
        full = len(emb) // n_templates                           # classes complete here
        if weights is None:
            weights = emb.new_empty(len(names), emb.shape[1])                # [C, e]
        used = full * n_templates
        weights[done:done + full] = emb[:used].view(full, n_templates, emb.shape[1]).mean(1)
        done, carry = done + full, emb[used:].clone()  # not a view of all emb
    return F.normalize(weights, dim=-1).t()                                  # [e, C]


def zero_shot_topk(image: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor) -> dict[str, float]:
    """``image [N, e]`` L2-normalised, ``labels [N]`` (-1: not counted), ``weights [e, C]``:
    ``zero_shot_top1``, ``zero_shot_top5`` (fractions of the labelled images),
    ``zero_shot_mean_per_class_recall`` (top-1 recall averaged over the classes present, as
    sklearn's balanced accuracy) and ``zero_shot_images`` (how many were labelled)."""
    labels = labels.to(image.device)
    keep = labels >= 0
    if keep.any() and int(labels.max()) >= weights.shape[1]:
        raise ValueError(f"label {int(labels.max())} but only {weights.shape[1]} class names")
    logits = image[keep].float() @ weights.to(image.device).float()          # [n, C]
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices                # [n, 5]
    target = labels[keep]                                                    # [n]
    hit = top == target[:, None]                                             # [n, 5]
    n = int(keep.sum())
    # per class present, in class order: top-1 hits / images, int64 counts divided in float64
    # and averaged with numpy (sklearn's balanced-accuracy arithmetic, bit for bit)
    count = torch.bincount(target, minlength=weights.shape[1]).cpu().numpy()            # [C]
    hits = torch.bincount(target[hit[:, 0]], minlength=weights.shape[1]).cpu().numpy()  # [C]
    present = count > 0
    per_class = hits[present] / count[present]
    return {"zero_shot_top1": float(hit[:, 0].sum()) / max(n, 1),
            "zero_shot_top5": float(hit.any(1).sum()) / max(n, 1),
            "zero_shot_mean_per_class_recall": float(per_class.mean()) if n else 0.0,
            "zero_shot_classes": int(weights.shape[1]), "zero_shot_images": n}


def zero_shot_accuracy(model: torch.nn.Module, cfg: Config, layout, tokenizer,
                       names: list[str] | None = None) -> dict | None:
    """Collective. ``{"zero_shot_top1": ..., "zero_shot_top5": ..., "eval_images": n}`` on the
    last stage, None elsewhere (``trainer.eval.evaluate`` restricted to zero-shot)."""
    from trainer.eval import evaluate

    out = evaluate(model, cfg, layout, tokenizer, tasks=("zero_shot",), names=names)
    if out is None:
        return None
    return {k: out[k] for k in ("zero_shot_top1", "zero_shot_top5", "eval_images")}
