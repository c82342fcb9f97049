"""DMU cluster labels: embed the training set with a stage's model, k-means the embeddings,
and append the cluster to each sample's accumulated label.

    make_stage_labels(cfg_k, source_ckpt, prev_table, out_path, layout, seed)   # collective

Every data-parallel replica embeds its share of ``data.train_urls`` (evaluation transforms, no
shuffle) forward-only through the pipeline, in lockstep; the last stage's TP rank 0 of each
replica writes ``features/rank_XXXXX.pt`` next to the table. Global rank 0 then reads them all,
sorts by sample key (the partition does not depend on the layout), runs k-means per modality
and writes the table ``{"labels": {key: group}, ...}`` atomically; the feature files go.
Groups are the distinct (previous group, new cluster) pairs, numbered in sorted order.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.distributed.device import default_device
from trainer.distributed.layout import ParallelLayout
from trainer.dmu.config import DMUConfig
from trainer.dmu.kmeans import kmeans

log = logging.getLogger("upclip")


def _features_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch.get("images"), batch.get("text"))

    def collect(output):
        if isinstance(output, dict):  # last stage
            return output["image_features"].sum() * 0.0, {
                "image": output["image_features"].float(), "text": output["text_features"].float()}
        return output.sum() * 0.0, {}

    return out, collect


@torch.no_grad()
def forward_features(model: torch.nn.Module, batch: dict, cfg: Config,
                     layout: ParallelLayout) -> dict | None:
    """Collective over the pipeline. ``{"image": [b, e], "text": [b, e]}`` (normalised, fp32)
    on the last stage, None elsewhere; the model runs in eval mode."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    was_training = model.training
    model.eval()
    try:
        out = get_forward_backward_func()(
            forward_step_func=_features_step, data_iterator=iter([batch]), model=[model],
            num_microbatches=1, seq_length=cfg.model.vision.seq_length,
            micro_batch_size=batch["images"].shape[0], forward_only=True)
    finally:
        model.train(was_training)
    return out[0] if layout.is_last_stage else None


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, cfg: Config, layout: ParallelLayout,
                  tokenizer) -> dict | None:
    """Collective. This replica's share of ``data.train_urls``: ``{"keys": [...], "image":
    [n, e], "text": [n, e]}`` on the last pipeline stage, None elsewhere."""
    from trainer.data import build_eval_loader
    from trainer.data.normalize import normalize_on_device

    loader = build_eval_loader(cfg.data, rank=layout.dp_rank, world=layout.dp,
                               urls=cfg.data.train_urls, tokenizer=tokenizer)
    size = cfg.data.eval_batch_size or cfg.data.batch_size
    device = next(model.parameters()).device
    v, a = cfg.model.vision, cfg.data.augment
    keys, image, text = [], [], []
    it = iter(loader)
    while True:
        batch = next(it, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)  # lockstep over every rank
        if not more.item():
            break
        n = 0 if batch is None else batch["images"].shape[0]
        images = torch.zeros(size, 3, v.image_size, v.image_size, device=device)
        tokens = torch.zeros(size, cfg.model.text.context_length, dtype=torch.long,
                             device=device)
        if n:
            images[:n] = normalize_on_device(batch["images"].to(device), a.mean, a.std)
            tokens[:n] = batch["text"].to(device)
        out = forward_features(model, {"images": images, "text": tokens, "size": size}, cfg,
                               layout)
        if out is not None and n:
            keys += list(batch["keys"])
            image.append(out["image"][:n].cpu())
            text.append(out["text"][:n].cpu())
        if layout.dp_rank == 0 and len(keys) and len(image) % 50 == 0:
            log.info("dmu: embedded %d samples on data rank 0", len(keys))
    if not layout.is_last_stage:
        return None
    e = cfg.model.embed_dim
    return {"keys": keys, "image": torch.cat(image) if image else torch.zeros(0, e),
            "text": torch.cat(text) if text else torch.zeros(0, e)}


def cluster_table(keys: list[str], image: torch.Tensor, text: torch.Tensor,
                  prev: dict[str, int] | None, dmu: DMUConfig, seed: int) -> dict:
    """k-means of this stage's embeddings, joined with the previous groups.
    -> ``{"labels": {key: group}, "num_groups": G, "group_sizes": [...], "clusters": {...}}``."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    if len(set(keys)) != len(keys):
        raise ValueError("dmu: the training shards hold duplicate sample keys; the label table "
                         "is keyed by sample key")
    image, text = image[order].float(), text[order].float()
    m = dmu.clusters
    zeros = torch.zeros(len(keys), dtype=torch.long)
    li = kmeans(image, m, seed=seed, iters=dmu.kmeans_iters)[0] \
        if dmu.cluster_on in ("both", "image") else zeros
    lt = kmeans(text, m, seed=seed + 1, iters=dmu.kmeans_iters)[0] \
        if dmu.cluster_on in ("both", "text") else zeros
    new = (lt * m + li) if dmu.cluster_on == "both" else li + lt
    before = [prev.get(k, -1) for k in keys] if prev else [0] * len(keys)
    pairs = list(zip(before, new.tolist()))
    index = {p: g for g, p in enumerate(sorted(set(pairs)))}
    labels = {k: index[p] for k, p in zip(keys, pairs)}
    sizes = torch.bincount(torch.tensor(list(labels.values())), minlength=len(index)).tolist()
    clusters = {name: torch.bincount(lab, minlength=m).tolist()
                for name, lab in (("image", li), ("text", lt))
                if dmu.cluster_on in ("both", name)}
    return {"labels": labels, "num_groups": len(index), "group_sizes": sizes,
            "clusters": clusters}


def make_stage_labels(cfg: Config, source: str, prev_table: str | None, out: Path,
                      layout: ParallelLayout, seed: int) -> None:
    """Collective: embed ``data.train_urls`` with the (dense) checkpoint ``source`` and write
    the stage's label table to ``out``."""
    from trainer import checkpoint
    from trainer.models.build import build_for_training
    from trainer.data import build_tokenizer
    from trainer.data.grouping import load_label_table

    feat_dir = out.parent / "features"
    if dist.get_rank() == 0:
        shutil.rmtree(feat_dir, ignore_errors=True)
        feat_dir.mkdir(parents=True)
    dist.barrier()
    model = build_for_training(cfg, layout)
    checkpoint.load_model(source, model, layout)
    device = default_device()
    model.to(device)
    log.info("dmu: embedding %s with %s", cfg.data.train_urls, source)
    got = embed_dataset(model, cfg, layout, build_tokenizer(cfg.data.tokenizer))
    del model
    if got is not None and layout.tp_rank == 0:
        torch.save(got, feat_dir / f"rank_{layout.dp_rank:05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        parts = [torch.load(feat_dir / f"rank_{r:05d}.pt") for r in range(layout.dp)]
        keys = [k for p in parts for k in p["keys"]]
        prev = load_label_table(prev_table) if prev_table else None
        table = cluster_table(keys, torch.cat([p["image"] for p in parts]),
                              torch.cat([p["text"] for p in parts]), prev, cfg.dmu, seed)
        b = cfg.data.batch_size
        small = sum(s for s in table["group_sizes"] if s < b)
        log.info("dmu: %d samples in %d groups (sizes %s); %d samples sit in groups smaller "
                 "than a batch (%d) and do not train this stage", len(keys),
                 table["num_groups"], table["group_sizes"][:16], small, b)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, out)
        shutil.rmtree(feat_dir, ignore_errors=True)
    dist.barrier()
