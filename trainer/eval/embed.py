"""One pass over an eval set: every sample's image and caption embedding (and every present
region's), from all data-parallel ranks. The metrics (trainer/eval/__init__.py) are pure
functions of the ``Embeddings`` it returns, whichever model produced them.

    emb = embed_distributed(ddp_model, cfg, layout, tokenizer, text=True, regions=True)
    emb = embed_plain(model, eval_batches(cfg, 0, 1, tokenizer), device)   # any encoder

Eval sets:
- WebDataset shards (``data.eval_urls``, clip_benchmark's ``split/nshards.txt`` folder too):
  trainer/data's eval loader (open_clip's eval transform by default, see
  trainer/data/eval_transform.py; no shuffle, the last partial batch kept), split over
  data-parallel ranks by shard.
- A CSV file (``eval.csv``; tab-separated when it ends in .tsv): a column of image paths
  (``eval.csv_image_key``, relative to the CSV's folder), one of captions
  (``eval.csv_caption_key``) and optionally one of integer class labels
  (``eval.csv_label_key``). Rows are split over ranks round-robin; images go through the same
  transform and tokenizer as shards.

Shards may hold classification samples without a caption (image + ``cls``, clip_benchmark's
layout: ``captioned`` is False for them, retrieval leaves them out) and several captions of
one image as the lines of its ``.txt`` (clip_benchmark's retrieval layout: the sample becomes
one (image, caption) row per line, the vision tower runs once per row). One sample (shard) or
row (CSV) per (image, caption) pair works too. ``image_ids`` hashes the transformed pixels, so
a repeated image is recognised as one gallery image; ``text_ids`` hashes the caption tokens,
and, for the lines of one multi-caption sample, its key too: they stay distinct captions even
where two images share a caption text, as clip_benchmark counts them (see
trainer/eval/retrieval.py).

The distributed pass runs images (and captions, and region boxes + captions) forward-only
through megatron's schedule, so it works at any TP/PP/EP. Every rank takes the same number of
microbatches (a rank out of data feeds padding rows, which are dropped) because MoE layers
exchange tokens across data-parallel ranks; the last stage then all-gathers the rows over DP.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass, fields
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import Config
from trainer.distributed.collectives import all_gather_ints, expert_group_ranks

log = logging.getLogger("upclip")


class EvalSetError(ValueError):
    """The eval set is missing, unreadable or empty; the message names the setting."""


@dataclass
class Embeddings:
    """Rows of every data-parallel rank (in no particular order). ``text`` and the region
    fields are None when they were not computed."""
    image: torch.Tensor                          # [N, e] L2-normalised, one row per sample
    image_ids: torch.Tensor                      # [N] int64, equal for equal (transformed) images
    labels: torch.Tensor                         # [N] int64 class label, -1 if none
    captioned: torch.Tensor | None = None        # [N] bool, False: no caption (image + cls)
    text: torch.Tensor | None = None             # [N, e] L2-normalised caption embeddings
    text_ids: torch.Tensor | None = None         # [N] int64, equal for equal caption tokens
    region: torch.Tensor | None = None           # [M, e] present regions only
    region_text: torch.Tensor | None = None      # [M, e]
    region_text_ids: torch.Tensor | None = None  # [M] int64
    region_box: torch.Tensor | None = None       # [M, 4] the regions' boxes, xyxy in [0, 1]
    region_box_pred: torch.Tensor | None = None  # [M, 4] the boxes their captions locate (CLOC)

    @property
    def num_samples(self) -> int:
        return int(self.image.shape[0])


def content_ids(rows: torch.Tensor) -> torch.Tensor:
    """``[N, ...] -> [N]`` int64: a 64-bit hash of each row's bytes (equal rows, equal ids)."""
    flat = rows.detach().cpu().contiguous().reshape(rows.shape[0], max(1, rows[0].numel())
                                                    if rows.shape[0] else 0).numpy()
    return torch.tensor([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(),
                                        "little", signed=True) for r in flat], dtype=torch.long)


# ----------------------------------------------------------------------------- eval sets

def describe_eval_set(cfg: Config) -> str:
    return f"eval.csv={cfg.eval.csv}" if cfg.eval.csv else f"data.eval_urls={cfg.data.eval_urls}"


def check_eval_set(cfg: Config) -> None:
    """Raises EvalSetError when the eval set cannot be read: no set configured, a local shard
    or CSV that does not exist, a CSV without the named columns. Cheap (no torch work)."""
    from trainer.data.urls import expand_urls

    if cfg.eval.csv:
        read_csv_rows(cfg)
        return
    if not cfg.data.eval_urls:
        raise EvalSetError("no eval set: set data.eval_urls (WebDataset shards) or eval.csv")
    try:
        urls = expand_urls(cfg.data.eval_urls, "data.eval_urls")
    except (ValueError, OSError) as e:
        raise EvalSetError(str(e)) from None
    for url in urls:
        local = ":" not in url.split("/", 1)[0] or url.startswith("file:")
        path = re.sub(r"^file:(//)?", "", url)  # as trainer/data/urls.py reads it
        if local and not os.path.isfile(path):
            raise EvalSetError(f"data.eval_urls={cfg.data.eval_urls!r}: shard {path!r} does "
                               "not exist")


def read_csv_rows(cfg: Config) -> list[tuple[str, str, int]]:
    """``(image path, caption, label or -1)`` per row of ``eval.csv``; paths made relative to
    the CSV's folder."""
    e = cfg.eval
    if not os.path.isfile(e.csv):
        raise EvalSetError(f"eval.csv={e.csv!r} does not exist")
    sep = "\t" if e.csv.endswith(".tsv") else ","
    base = os.path.dirname(os.path.abspath(e.csv))
    with open(e.csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = reader.fieldnames or []
        wanted = [("eval.csv_image_key", e.csv_image_key), ("eval.csv_caption_key",
                                                            e.csv_caption_key)]
        if e.csv_label_key:
            wanted.append(("eval.csv_label_key", e.csv_label_key))
        missing = [f"{k}={v!r}" for k, v in wanted if v not in cols]
        if missing:
            raise EvalSetError(f"eval.csv={e.csv!r}: no column {', '.join(missing)} (its header "
                               f"has {cols}, separator {sep!r})")
        rows = []
        for n, row in enumerate(reader, 2):
            label = -1
            if e.csv_label_key:
                try:
                    label = int(row[e.csv_label_key])
                except (TypeError, ValueError):
                    raise EvalSetError(f"{e.csv}:{n}: {e.csv_label_key}="
                                       f"{row[e.csv_label_key]!r} is not an integer") from None
            rows.append((os.path.join(base, row[e.csv_image_key] or ""),
                         row[e.csv_caption_key] or "", label))
    if not rows:
        raise EvalSetError(f"eval.csv={e.csv!r} has no rows")
    return rows


class _CsvRows(torch.utils.data.Dataset):
    """CSV rows -> examples through the shard pipeline's processor (same transform and
    tokenizer); a row whose image is missing or does not decode gives None."""

    def __init__(self, rows: list[tuple[str, str, int]], processor):
        from trainer.data.counters import DataCounters
        self.rows, self.processor, self.counters = rows, processor, DataCounters()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from trainer.data.schema import IMAGE_EXTS
        path, caption, label = self.rows[i]
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        raw = {"__key__": f"row{i}", "__url__": path,  # one row, one caption (even multi-line)
               "txt": " ".join(caption.splitlines()).encode("utf-8"),
               "cls": str(label).encode()}
        try:
            with open(path, "rb") as f:
                raw[ext if ext in IMAGE_EXTS else "jpg"] = f.read()
        except OSError:
            pass  # counted as missing_image by the processor
        return self.processor(raw, self.counters, None)


class _Collate:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list) -> dict | None:
        kept = [one for e in examples if e is not None
                for one in (e if isinstance(e, list) else (e,))]
        if not kept:
            return {"skipped": len(examples)}
        return {**self.processor.collate(kept), "skipped": len(examples) - len(kept)}


def eval_batches(cfg: Config, rank: int, world: int, tokenizer) -> Iterator[dict]:
    """Batches of data-parallel rank ``rank`` of ``world`` (trainer/data's batch dict) from
    the eval set. Raises EvalSetError when it cannot be read."""
    from trainer.data.pipeline import build_eval_loader, sample_processor

    check_eval_set(cfg)
    if not cfg.eval.csv:
        yield from build_eval_loader(cfg.data, rank=rank, world=world, tokenizer=tokenizer)
        return
    processor = sample_processor(cfg.data, False, tokenizer)
    rows = read_csv_rows(cfg)[rank::world]
    loader = torch.utils.data.DataLoader(
        _CsvRows(rows, processor), batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
        num_workers=cfg.data.workers, collate_fn=_Collate(processor))
    skipped = 0
    for batch in loader:
        skipped += batch.pop("skipped")
        if "images" in batch:
            yield batch
    if skipped:
        log.warning("eval: %d of %d CSV rows on data rank %d skipped (image missing or not "
                    "decodable)", skipped, len(rows), rank)


# ----------------------------------------------------------------------------- batches

def batch_ids(batch: dict, regions: bool) -> dict[str, torch.Tensor]:
    """Row ids of a loader batch (CPU): image / caption hashes, labels, region caption
    hashes of the present regions (row-major)."""
    text = batch["text"].cpu()
    group = batch.get("caption_group")  # the captions of one multi-caption sample: distinct
    if group is not None:
        text = torch.cat([text, group.long().cpu()[:, None]], dim=1)        # [B, L + 1]
    captioned = batch.get("captioned")
    out = {"image_ids": content_ids(batch["images"]), "labels": batch["labels"].long().cpu(),
           "text_ids": content_ids(text),
           "captioned": (torch.ones(len(text), dtype=torch.bool) if captioned is None
                         else captioned.bool().cpu())}
    if regions:
        mask = batch["region_mask"].cpu()
        out["region_text_ids"] = content_ids(batch["region_text"].cpu()[mask])
        out["region_box"] = batch["region_boxes"].cpu().float()[mask]           # [M, 4]
    return out


def _padded(batch: dict | None, size: int, template: dict[str, torch.Tensor]) -> dict:
    """``batch`` padded with zero rows to ``size`` (an all-padding batch when None)."""
    out = {"size": size}
    for k, row in template.items():
        have = row.new_zeros((0, *row.shape)) if batch is None else batch[k]
        n = size - have.shape[0]
        out[k] = torch.cat([have, have.new_zeros((n, *have.shape[1:]))]) if n else have
    return out


def _forward_step(data_iterator, model, text: bool, regions: bool, train_cfg,
                  ground: bool = False):
    from trainer.distributed.device import eval_autocast
    from trainer.step import region_inputs

    batch = next(data_iterator)
    with eval_autocast(train_cfg.precision):
        out = model(batch["images"], batch["text"] if text else None,
                    **(region_inputs(batch, ground) if regions else {}))

    def collect(output):
        if isinstance(output, dict):  # the last stage
            feats = {k: v.float() for k, v in output.items()
                     if k.endswith("features") or k == "region_box_pred"}
            return output["image_features"].sum() * 0.0, feats
        return output.sum() * 0.0, {}

    return out, collect


def _rows(out: dict, n: int, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The ``n`` real rows of a forward's features; regions: only the present ones."""
    rows = {"image": out["image_features"][:n]}
    if "text_features" in out:
        rows["text"] = out["text_features"][:n]
    if mask is not None:
        m = mask[:n].to(out["region_features"].device)
        rows["region"] = out["region_features"][:n][m]                      # [M, e]
        rows["region_text"] = out["region_text_features"][:n][m]            # [M, e]
        if "region_box_pred" in out:
            rows["region_box_pred"] = out["region_box_pred"][:n][m]          # [M, 4]
    return rows


def _assemble(parts: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    keys = {k for p in parts for k in p}
    return {k: torch.cat([p[k].to(device) for p in parts if k in p]) for k in keys}


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather rows of unequal counts over ``group`` (rank order)."""
    if t.dtype == torch.bool:  # gathered as bytes
        return _gather_rows(t.to(torch.uint8), group).bool()
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    most = int(max(int(s) for s in sizes))
    padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    got = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(got, padded.contiguous(), group=group)
    return torch.cat([g[:int(s)] for g, s in zip(got, sizes)])


def _to_embeddings(rows: dict[str, torch.Tensor]) -> Embeddings:
    names = {f.name for f in fields(Embeddings)}
    return Embeddings(**{k: v for k, v in rows.items() if k in names})


@torch.no_grad()
def embed_distributed(model: torch.nn.Module, cfg: Config, layout, tokenizer, *,
                      text: bool = True, regions: bool = False) -> Embeddings | None:
    """Collective (every rank). The eval set's embeddings, gathered over data-parallel ranks,
    on the last pipeline stage; None elsewhere. ``regions`` needs text and a CLOC prompter.
    Raises EvalSetError on every rank when no rank got a sample."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from trainer.data.normalize import normalize_on_device
    from trainer.eval import eval_mode
    from trainer.distributed.grads import unwrap

    inner = unwrap(model)
    device = next(inner.parameters()).device
    size = cfg.data.eval_batch_size or cfg.data.batch_size
    v, L, R = cfg.model.vision, cfg.model.text.context_length, cfg.data.max_regions
    regions = regions and R > 0 and cfg.model.prompter.layers > 0
    ground = regions and cfg.model.prompter.grounding
    text = text or regions
    template = {"images": torch.zeros(3, v.image_size, v.image_size),
                "text": torch.zeros(L, dtype=torch.long)}
    if regions:
        template.update(region_boxes=torch.zeros(R, 4), region_text=torch.zeros(R, L,
                                                                                dtype=torch.long),
                        region_mask=torch.zeros(R, dtype=torch.bool))
    batches = eval_batches(cfg, layout.dp_rank, layout.dp, tokenizer)
    ep = expert_group_ranks()
    step = functools.partial(_forward_step, text=text, regions=regions, train_cfg=cfg.train,
                             ground=ground)
    parts, count = [], 0
    with eval_mode(model):
        while True:
            batch = next(batches, None)
            if cfg.eval.max_batches and count >= cfg.eval.max_batches:
                batch = None
            # lockstep (MoE all-to-alls span ranks) and the region-caption rows of the EP group
            # (region_inputs): one all-gather of [has a batch, present regions] per batch, the
            # count read from the CPU mask
            present = int(batch["region_mask"].sum()) if regions and batch is not None else 0
            every = all_gather_ints([int(batch is not None), present])              # [world][2]
            if not any(has for has, _ in every):
                break
            count += 1
            mb = _padded(batch, size, template)
            if regions:
                mb["region_rows"] = max(every[r][1] for r in ep)
            a = cfg.data.augment
            mb = {k: (t.to(device) if torch.is_tensor(t) else t) for k, t in mb.items()}
            mb["images"] = normalize_on_device(mb["images"], a.mean, a.std)
            out = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([mb]), model=[model],
                num_microbatches=1, seq_length=v.seq_length, micro_batch_size=size,
                forward_only=True)
            if layout.is_last_stage and batch is not None:
                n = batch["images"].shape[0]
                feats = _rows(out[0], n, batch["region_mask"] if regions else None)
                ids = batch_ids(batch, regions)
                parts.append({**feats, **{k: t.to(device) for k, t in ids.items()}})
    batches.close()  # eval.max_batches may stop before the loader's end: release its workers
    if count == 0:
        raise EvalSetError(f"{describe_eval_set(cfg)}: no sample could be read on any rank")
    if not layout.is_last_stage:
        return None
    rows = _local_rows(parts, device, cfg.model.embed_dim, text, regions, ground)
    if layout.dp > 1:
        rows = {k: _gather_rows(t, layout.dp_group()) for k, t in sorted(rows.items())}
    return _to_embeddings(rows)


def _local_rows(parts: list[dict], device, dim: int, text: bool, regions: bool,
                ground: bool = False) -> dict:
    """This rank's rows; empty tensors of the right shape when it had no sample."""
    empty = {"image": torch.zeros(0, dim), "image_ids": torch.zeros(0, dtype=torch.long),
             "labels": torch.zeros(0, dtype=torch.long),
             "captioned": torch.zeros(0, dtype=torch.bool)}
    if text:
        empty.update(text=torch.zeros(0, dim), text_ids=torch.zeros(0, dtype=torch.long))
    if regions:
        empty.update(region=torch.zeros(0, dim), region_text=torch.zeros(0, dim),
                     region_text_ids=torch.zeros(0, dtype=torch.long),
                     region_box=torch.zeros(0, 4))
    if ground:
        empty.update(region_box_pred=torch.zeros(0, 4))
    rows = _assemble(parts, device) if parts else {}
    return {k: rows.get(k, e.to(device)) for k, e in empty.items()}


@torch.no_grad()
def embed_plain(model, batches: Iterable[dict], device=None, *, text: bool = True,
                regions: bool = False, mean=None, std=None, ground: bool = False) -> Embeddings:
    """One process, any model with ``encode_image(images [b, 3, S, S]) -> [b, e]`` and
    ``encode_text(tokens [b, L]) -> [b, e]`` (and, for ``regions``,
    ``encode_regions(images, boxes [b, R, 4] xyxy in [0, 1]) -> [b, R, e]``; for ``ground``,
    ``locate_regions(images, region_text [b, R, e] L2-normalised) -> [b, R, 4]``): an
    exported plain-PyTorch model, open_clip, or this repo's CLIP at world size 1."""
    from trainer.data.config import CLIP_MEAN, CLIP_STD
    from trainer.data.normalize import normalize_on_device

    mean, std = mean or CLIP_MEAN, std or CLIP_STD
    regions = regions and hasattr(model, "encode_regions")
    text = text or regions
    parts = []
    for batch in batches:
        images = normalize_on_device(batch["images"].to(device), mean, std)
        rows = {"image": F.normalize(model.encode_image(images).float(), dim=-1)}
        if text:
            rows["text"] = F.normalize(model.encode_text(batch["text"].to(device)).float(), dim=-1)
        if regions:
            mask = batch["region_mask"].to(device)
            r = model.encode_regions(images, batch["region_boxes"].to(device)).float()
            b, k, L = batch["region_text"].shape
            t = model.encode_text(batch["region_text"].to(device).view(b * k, L)).float()
            rows["region"] = F.normalize(r, dim=-1)[mask]
            rows["region_text"] = F.normalize(t.view(b, k, -1), dim=-1)[mask]
            if ground:
                located = model.locate_regions(images, F.normalize(t.view(b, k, -1), dim=-1))
                rows["region_box_pred"] = located.float()[mask]                  # [M, 4]
        ids = batch_ids(batch, regions)
        if not text:
            ids.pop("text_ids")
        parts.append({**rows, **ids})
    if not parts:
        raise EvalSetError("the eval set gave no sample")
    return _to_embeddings(_assemble(parts, device or "cpu"))
