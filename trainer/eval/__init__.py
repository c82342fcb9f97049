"""Evaluation: zero-shot classification (zeroshot.py), image-text retrieval Recall@K
(retrieval.py) and CLOC region retrieval (regions.py), all from one pass of embeddings over
the eval set (embed.py).

    result = evaluate(ddp_model, cfg, layout, tokenizer)      # collective: the in-training hook
    result = compute_metrics(embeddings, cfg, encode_text, tokenizer)   # any model's embeddings

``eval.tasks`` names what to compute; a task runs when the data supports it (zero_shot: some
samples carry a class label; regions: some samples carry region boxes and the model has a CLOC
prompter). The result is one flat dict (train.py logs it as ``eval/<key>``):

  eval_images                                     samples evaluated (caption rows)
  zero_shot_top1, zero_shot_top5, zero_shot_mean_per_class_recall, zero_shot_images,
  zero_shot_classes
  image_to_text_r{1,5,10}, text_to_image_r{1,5,10}   (+ ``_chance``: a random ranking's value)
  retrieval_images, retrieval_texts               distinct images / captions
  region_to_text_r{1,5,10}, text_to_region_r{1,5,10} (+ ``_chance``), regions, region_texts
  grounding_acc50, grounding_miou, grounding_regions   (model.prompter.grounding: the box each
                                                  region caption locates, IoU >= 0.5 a hit)
  acc1, acc5, mean_per_class_recall, image_retrieval_recall@K, text_retrieval_recall@K:
      the same numbers under clip_benchmark's names (``with_clip_benchmark_names``)

Several eval sets per run (``eval.sets``): ``trainer.eval.sets.run_sets`` runs
``evaluate`` once per set and reports each under its name.

Importing this package is cheap; torch and megatron load when a function runs.
"""
from __future__ import annotations

import contextlib
from typing import Callable

TASKS = ("zero_shot", "retrieval", "regions")

__all__ = ["TASKS", "compute_metrics", "eval_mode", "evaluate", "format_metrics",
           "with_clip_benchmark_names"]


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside, the previous mode after; MoE routing statistics gathered
    meanwhile are dropped (evaluation stays out of the training statistics)."""
    from trainer.moe.layer import MoEMLP
    from trainer.distributed.grads import unwrap

    inner = unwrap(model)
    was_training = inner.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
        for m in inner.modules():
            if isinstance(m, MoEMLP):
                m.pop_stats()


def compute_metrics(emb, cfg, encode_text: Callable | None = None, tokenizer=None,
                    device=None, tasks=None, names: list[str] | None = None) -> dict:
    """The metrics of ``emb`` (an ``embed.Embeddings``). Pure but for zero-shot, which runs
    ``encode_text`` on the class prompts (``names.templates(cfg)``; class names from ``names``
    or ``names.class_names(cfg)``). Retrieval counts the captioned samples only. With this
    repo's MoE CLIP, call it on every last-stage rank alike (text experts exchange tokens)."""
    import torch

    from trainer.eval.names import class_names, templates
    from trainer.eval.regions import grounding_accuracy, region_retrieval
    from trainer.eval.retrieval import image_text_retrieval
    from trainer.eval.zeroshot import classifier, zero_shot_topk

    tasks = tuple(cfg.eval.tasks if tasks is None else tasks)
    out: dict = {"eval_images": emb.num_samples}
    if "zero_shot" in tasks and bool((emb.labels >= 0).any()):
        if encode_text is None or tokenizer is None:
            raise ValueError("zero-shot needs encode_text and a tokenizer")
        names = names or class_names(cfg)
        with torch.no_grad():
            weights = classifier(encode_text, tokenizer, names, templates(cfg), device=device)
        out.update(zero_shot_topk(emb.image, emb.labels, weights))
    keep = emb.captioned if emb.captioned is not None else torch.ones(emb.num_samples,
                                                                      dtype=torch.bool)
    keep = keep.to(emb.image.device)
    if "retrieval" in tasks and emb.text is not None and bool(keep.any()):
        out.update(image_text_retrieval(emb.image[keep], emb.text[keep],
                                        emb.image_ids.to(keep.device)[keep],
                                        emb.text_ids.to(keep.device)[keep]))
    if "regions" in tasks and emb.region is not None and emb.region.shape[0]:
        out.update(region_retrieval(emb.region, emb.region_text, emb.region_text_ids))
    if "regions" in tasks and emb.region_box_pred is not None and emb.region_box_pred.shape[0]:
        out.update(grounding_accuracy(emb.region_box_pred, emb.region_box))
    return with_clip_benchmark_names(out)


def with_clip_benchmark_names(m: dict) -> dict:
    """``m`` plus the same numbers under clip_benchmark 1.6.2's names: ``acc1``, ``acc5``
    (only with >= 5 classes; clip_benchmark reports NaN below), ``mean_per_class_recall``,
    ``image_retrieval_recall@K`` (caption -> image) and ``text_retrieval_recall@K``
    (image -> caption), the recalls rounded to float32 as clip_benchmark computes them."""
    import torch

    out = dict(m)
    if "zero_shot_top1" in m:
        out["acc1"] = m["zero_shot_top1"]
        if m.get("zero_shot_classes", 0) >= 5:
            out["acc5"] = m["zero_shot_top5"]
        out["mean_per_class_recall"] = m["zero_shot_mean_per_class_recall"]
    for ours, theirs, queries in (("text_to_image", "image_retrieval", "retrieval_texts"),
                                  ("image_to_text", "text_retrieval", "retrieval_images")):
        for k in (1, 5, 10):
            if f"{ours}_r{k}" in m:  # clip_benchmark averages the hits in float32
                n = m[queries]
                hits = round(m[f"{ours}_r{k}"] * n)
                out[f"{theirs}_recall@{k}"] = float(torch.tensor(float(hits),
                                                                 dtype=torch.float32) / n)
    return out


def evaluate(model, cfg, layout, tokenizer, tasks=None,
             names: list[str] | None = None) -> dict | None:
    """Collective (every rank): the metrics of ``eval.tasks`` (or ``tasks``) on the eval set
    (``eval.csv`` or ``data.eval_urls``) on the last pipeline stage; None elsewhere, and None
    everywhere when no eval set is configured. Raises ``embed.EvalSetError`` (on every rank)
    when the eval set cannot be read."""
    if not (cfg.data.eval_urls or cfg.eval.csv):
        return None
    from trainer.eval.embed import embed_distributed
    from trainer.distributed.device import eval_autocast
    from trainer.distributed.grads import unwrap

    tasks = tuple(cfg.eval.tasks if tasks is None else tasks)
    with eval_mode(model):
        emb = embed_distributed(model, cfg, layout, tokenizer,
                                text="retrieval" in tasks or "regions" in tasks,
                                regions="regions" in tasks)
        if emb is None:
            return None
        inner = unwrap(model)
        with eval_autocast(cfg.train.precision):
            return compute_metrics(emb, cfg, inner.encode_text, tokenizer,
                                   next(inner.parameters()).device, tasks, names)


def format_metrics(m: dict) -> str:
    """One log line: ``zero-shot top-1 0.7000 top-5 0.9800 | image->text R@1/5/10 ...``."""
    parts = []
    if "zero_shot_top1" in m:
        parts.append(f"zero-shot top-1 {m['zero_shot_top1']:.4f} top-5 {m['zero_shot_top5']:.4f}")
    for name, label in (("image_to_text", "image->text"), ("text_to_image", "text->image"),
                        ("region_to_text", "region->text"), ("text_to_region", "text->region")):
        ks = [k for k in (1, 5, 10) if f"{name}_r{k}" in m]
        if ks:
            parts.append(f"{label} R@{'/'.join(map(str, ks))} "
                         + "/".join(f"{m[f'{name}_r{k}']:.3f}" for k in ks))
    if "grounding_acc50" in m:
        parts.append(f"grounding acc@0.5 {m['grounding_acc50']:.3f}")
    return " | ".join(parts) + f" ({m.get('eval_images', 0)} samples)"
