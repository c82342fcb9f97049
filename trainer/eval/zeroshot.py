"""Zero-shot classification: class-name prompts through the text tower give one classifier
row per class (templates averaged, as in CLIP); an image is assigned the class whose row is
closest to its embedding.

    acc = zero_shot_accuracy(ddp_model, cfg, layout, tokenizer)   # collective; every rank

Images run through the pipeline forward-only, one microbatch at a time. Every rank takes the
same number of microbatches (ranks that ran out of eval data feed a padding batch) because
MoE layers exchange tokens across data-parallel ranks; padding carries label -1 and is not
counted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import Config
from trainer.distributed.layout import ParallelLayout

log = logging.getLogger("upclip")


def class_names(cfg: Config) -> list[str]:
    """``eval.classnames``, else ``classnames`` from the dataset.json that
    tools/make_shards.py writes beside the eval shards."""
    if cfg.eval.classnames:
        return list(cfg.eval.classnames)
    from trainer.data.urls import expand_urls

    first = expand_urls(cfg.data.eval_urls, "data.eval_urls")[0]
    meta = Path(first).parent / "dataset.json"
    try:
        names = json.loads(meta.read_text()).get("classnames")
    except (OSError, json.JSONDecodeError):
        names = None
    if not names:
        raise ValueError(f"eval.classnames is empty and {meta} has no classnames: set "
                         "eval.classnames")
    return list(names)


@torch.no_grad()
def classifier(model: torch.nn.Module, tokenizer, names: list[str], templates: list[str],
               chunk: int = 256) -> torch.Tensor:
    """``[e, C]``: per class, the normalised mean of its normalised prompt embeddings. Runs
    the text tower (last pipeline stage only)."""
    device = next(model.parameters()).device
    prompts = [t.format(n) for n in names for t in templates]
    tokens = tokenizer(prompts).to(device)                                   # [C*T, L]
    emb = torch.cat([model.encode_text(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)])
    emb = F.normalize(emb.float(), dim=-1).view(len(names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).t()                                      # [e, C]


def _image_features_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["images"], None)

    def collect(output):
        if isinstance(output, dict):  # last stage
            feats = output["image_features"].float()
            return feats.sum() * 0.0, {"image_features": feats, "labels": batch["labels"]}
        return output.sum() * 0.0, {}

    return out, collect


def _padded(batch: dict | None, size: int, template: dict) -> dict:
    """``batch`` padded to ``size`` rows (label -1), or an all-padding batch."""
    images = template["images"][:0] if batch is None else batch["images"]
    labels = template["labels"][:0] if batch is None else batch["labels"]
    n = size - images.shape[0]
    if n:
        images = torch.cat([images, images.new_zeros((n, *template["images"].shape[1:]))])
        labels = torch.cat([labels, labels.new_full((n,), -1)])
    return {"images": images, "labels": labels, "size": size}


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, cfg: Config, layout: ParallelLayout,
                       tokenizer, names: list[str] | None = None) -> dict | None:
    """Collective. ``{"zero_shot_top1": ..., "zero_shot_top5": ..., "eval_images": n}`` on the
    last stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from trainer.data import build_eval_loader
    from trainer.data.normalize import normalize_on_device
    from trainer.moe.layer import MoEMLP
    from trainer.step import unwrap

    inner = unwrap(model)
    names = names or class_names(cfg)
    weights = classifier(inner, tokenizer, names, cfg.eval.templates) if layout.is_last_stage else None
    loader = build_eval_loader(cfg.data, rank=layout.dp_rank, world=layout.dp, tokenizer=tokenizer)
    size = cfg.data.eval_batch_size or cfg.data.batch_size
    v = cfg.model.vision
    template = {"images": torch.zeros(1, 3, v.image_size, v.image_size),
                "labels": torch.zeros(1, dtype=torch.long)}
    device = next(inner.parameters()).device
    correct = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, count
    it, batches = iter(loader), 0
    was_training = inner.training
    model.eval()
    try:
        while True:
            batch = next(it, None)
            if cfg.eval.max_batches and batches >= cfg.eval.max_batches:
                batch = None
            more = torch.tensor([0.0 if batch is None else 1.0], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)  # lockstep: MoE all-to-alls span ranks
            if not more.item():
                break
            batches += 1
            mb = _padded(batch, size, template)
            a = cfg.data.augment
            mb["images"] = normalize_on_device(mb["images"].to(device), a.mean, a.std)
            out = get_forward_backward_func()(
                forward_step_func=_image_features_step, data_iterator=iter([mb]), model=[model],
                num_microbatches=1, seq_length=v.seq_length, micro_batch_size=size,
                forward_only=True)
            if layout.is_last_stage:
                logits = out[0]["image_features"] @ weights                  # [b, C]
                labels = out[0]["labels"].to(device)
                keep = labels >= 0
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices    # [b, 5]
                hit = top == labels[:, None]
                correct += torch.stack([hit[:, 0][keep].sum(), hit.any(1)[keep].sum(),
                                        keep.sum()]).double()
    finally:
        if was_training:
            model.train()
        for m in inner.modules():  # eval routing stays out of the training statistics
            if isinstance(m, MoEMLP):
                m.pop_stats()
    if not layout.is_last_stage:
        return None
    if layout.dp > 1:
        dist.all_reduce(correct, group=layout.dp_group())
    top1, top5, n = correct.tolist()
    return {"zero_shot_top1": top1 / max(n, 1), "zero_shot_top5": top5 / max(n, 1),
            "eval_images": int(n)}


def evaluate(model, cfg: Config, layout: ParallelLayout, tokenizer) -> dict | None:
    """``zero_shot_accuracy`` when ``data.eval_urls`` is set (None otherwise)."""
    if not cfg.data.eval_urls:
        return None
    return zero_shot_accuracy(model, cfg, layout, tokenizer)

