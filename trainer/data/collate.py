"""Raw sample -> training example -> fixed-shape batch.

A batch is a dict of tensors (B = batch size, R = data.max_regions, L = context length):
  images        [B, 3, S, S] float32, CLIP-normalised (data.normalize=loader, the default), or
                uint8 0..255 RGB (data.normalize=device: call normalize_on_device on the device)
  text          [B, L] int64, one eot per row
  region_boxes  [B, R, 4] float32, xyxy normalised to [0, 1] of the output image (0 if absent)
  region_text   [B, R, L] int64 (absent regions hold the tokens of "", so still one eot per row)
  region_mask   [B, R] bool, True where a region is present
  labels        [B] int64, class label of eval splits (-1 if none)
  captioned     [B] bool, False for an eval set's caption-less classification sample
  caption_group [B] int64, 0; for the captions of one multi-caption eval sample, a hash of its
                key (they are then distinct captions of one image, whatever their text)
  keys          list[str] of sample keys

Collation writes every example straight into its slot of the batch tensors (in a DataLoader
worker those are allocated in shared memory, so handing the batch over copies nothing).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from trainer.data.counters import DataCounters
from trainer.data.schema import SkipSample, decode_sample
from trainer.data.tokenizer import Tokenizer
from trainer.data.transforms import ImageTransform, Placement


@dataclass
class Example:
    key: str
    pixels: torch.Tensor         # [3, S, S] uint8
    boxes: np.ndarray            # [k, 4] normalised xyxy, k <= R
    tokens: list[tuple[int, ...]]  # 1 + k unpadded rows: caption then region captions
    label: int
    captioned: bool = True
    caption_group: int = 0       # != 0: one of several captions of one image (eval sets)


class SampleProcessor:
    """Decode, transform (boxes move with the image), keep up to R regions, tokenize, collate."""

    def __init__(self, transform: ImageTransform, tokenizer: Tokenizer, max_regions: int,
                 normalize: str = "loader", eval_set: bool = False):
        if normalize not in ("loader", "device"):
            raise ValueError(f"data.normalize={normalize!r}: expected loader or device")
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_regions = max_regions
        self.normalize = normalize
        # eval sets: image + cls samples without a caption are kept; a caption of N lines is
        # N captions of the image: N examples sharing the pixels (retrieval's gallery image)
        self.eval_set = eval_set
        self.empty_row = tokenizer.row_ids("")  # sot, eot

    def __call__(self, raw: dict, counters: DataCounters, rng: random.Random | None
                 ) -> Example | list[Example] | None:
        """The example, or None when the sample is skipped (counted in `counters`); an eval
        set's sample with an N-line caption (N > 1) gives a list of N examples."""
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            d = decode_sample(raw, counters, want_regions=self.max_regions > 0,
                              load=lambda img: self.transform.place(img, rng),
                              labelled_without_caption=self.eval_set)
            placed: Placement = d.image
            boxes, keep = self.transform.boxes(placed, d.boxes)
        except SkipSample as e:
            counters.record(e.reason, where, e.detail)
            return None
        except Exception as e:  # never let one sample kill a run
            counters.record("sample_error", where, f"{type(e).__name__}: {e}"[:200])
            return None
        dropped = int((~keep).sum())
        if dropped:
            counters.record("box_cropped_away", where, n=dropped)
        captions = [c for c, k in zip(d.region_captions, keep) if k]
        scores = [s for s, k in zip(d.region_scores, keep) if k]
        if len(captions) > self.max_regions:
            counters.record("regions_truncated", where, n=len(captions) - self.max_regions)
            order = sorted(range(len(captions)), key=lambda i: -scores[i])[: self.max_regions]
            order.sort()  # keep the stored order among the chosen ones
            boxes, captions = boxes[order], [captions[i] for i in order]
        region_rows = [self.tokenizer.row_ids(t) for t in captions]
        boxes = boxes / float(self.transform.size)
        counters.ok()
        lines = [t.strip() for t in d.caption.splitlines() if t.strip()] if self.eval_set else []
        if len(lines) > 1:
            group = caption_group(raw.get("__url__", ""), d.key)
            return [Example(d.key, placed.pixels, boxes, [self.tokenizer.row_ids(t)] + region_rows,
                            d.label, True, group) for t in lines]
        tokens = [self.tokenizer.row_ids(d.caption)] + region_rows
        return Example(d.key, placed.pixels, boxes, tokens, d.label, bool(d.caption))

    def collate(self, examples: list[Example]) -> dict:
        """Stack examples into the fixed-shape batch described in the module docstring."""
        B, R, L, S = len(examples), self.max_regions, self.tokenizer.context_length, self.transform.size
        pad = self.tokenizer.pad_token_id
        loader_norm = self.normalize == "loader"
        images = _empty((B, 3, S, S), torch.float32 if loader_norm else torch.uint8)
        text = _empty((B, L), torch.int64)
        region_text = _empty((B, R, L), torch.int64)
        region_boxes = _empty((B, R, 4), torch.float32)
        region_mask = _empty((B, R), torch.bool)
        labels = _empty((B,), torch.int64)
        captioned = _empty((B,), torch.bool)
        groups = _empty((B,), torch.int64)
        images_np, text_np, rtext_np = images.numpy(), text.numpy(), region_text.numpy()
        boxes_np, mask_np = region_boxes.numpy(), region_mask.numpy()
        text_np.fill(pad)
        rtext_np.fill(pad)
        rtext_np[:, :, : len(self.empty_row)] = self.empty_row
        boxes_np.fill(0.0)
        mask_np.fill(False)
        for b, ex in enumerate(examples):
            # numpy's strided copy (and uint8 -> float32 cast) beats torch's by ~1.6x here
            images_np[b] = ex.pixels.numpy()
            if loader_norm:
                slot = images[b]  # float32 0..255 now
                self.transform.normalize(slot, out=slot)
            row = ex.tokens[0]
            text_np[b, : len(row)] = row
            k = len(ex.boxes)
            if k:
                boxes_np[b, :k] = ex.boxes
                mask_np[b, :k] = True
                for r, row in enumerate(ex.tokens[1:]):  # never shorter than the empty row
                    rtext_np[b, r, : len(row)] = row
        labels.numpy()[:] = [ex.label for ex in examples]
        captioned.numpy()[:] = [ex.captioned for ex in examples]
        groups.numpy()[:] = [ex.caption_group for ex in examples]
        return {
            "images": images,               # [B, 3, S, S] float32 (loader) | uint8 (device)
            "text": text,                   # [B, L]
            "region_boxes": region_boxes,   # [B, R, 4]
            "region_text": region_text,     # [B, R, L]
            "region_mask": region_mask,     # [B, R]
            "labels": labels,               # [B]
            "captioned": captioned,         # [B]
            "caption_group": groups,        # [B]
            "keys": [ex.key for ex in examples],
        }


def caption_group(url: str, key: str) -> int:
    """A nonzero 63-bit id of sample ``key`` of shard ``url`` (its captions' group)."""
    digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # private, as in torch's collate
    if new_shared is None:  # pragma: no cover - a torch without it: the hand-over copies once
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    storage = new_shared(max(1, math.prod(shape)) * itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
