"""Raw sample -> training example -> fixed-shape batch.

A batch is a dict of tensors (B = batch size, R = data.max_regions, L = context length):
  images        [B, 3, S, S] float32, CLIP-normalised
  text          [B, L] int64, one eot per row
  region_boxes  [B, R, 4] float32, xyxy normalised to [0, 1] of the output image (0 if absent)
  region_text   [B, R, L] int64 (absent regions hold the tokens of "", so still one eot per row)
  region_mask   [B, R] bool, True where a region is present
  labels        [B] int64, class label of eval splits (-1 if none)
  keys          list[str] of sample keys
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.counters import DataCounters
from trainer.data.schema import SkipSample, decode_sample
from trainer.data.tokenizer import Tokenizer
from trainer.data.transforms import ImageTransform


@dataclass
class Example:
    key: str
    image: torch.Tensor          # [3, S, S]
    boxes: np.ndarray            # [k, 4] normalised xyxy, k <= R
    tokens: torch.Tensor         # [1 + k, L]: caption then region captions
    label: int


class SampleProcessor:
    """Decode, transform (boxes move with the image), keep up to R regions, tokenize."""

    def __init__(self, transform: ImageTransform, tokenizer: Tokenizer, max_regions: int):
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_regions = max_regions

    def __call__(self, raw: dict, counters: DataCounters, rng: random.Random | None) -> Example | None:
        """The example, or None when the sample is skipped (counted in `counters`)."""
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            d = decode_sample(raw, counters, want_regions=self.max_regions > 0)
            image, boxes, keep = self.transform(d.image, d.boxes, rng)
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
        tokens = self.tokenizer([d.caption] + captions)  # [1 + k, L]
        counters.ok()
        return Example(d.key, image, boxes, tokens, d.label)


def collate(examples: list[Example], max_regions: int, empty_tokens: torch.Tensor) -> dict:
    """Stack examples into the fixed-shape batch described in the module docstring."""
    B, R, L = len(examples), max_regions, empty_tokens.shape[-1]
    region_boxes = torch.zeros(B, R, 4, dtype=torch.float32)
    region_text = empty_tokens.view(1, 1, L).repeat(B, R, 1)
    region_mask = torch.zeros(B, R, dtype=torch.bool)
    for b, ex in enumerate(examples):
        k = len(ex.boxes)
        if k:
            region_boxes[b, :k] = torch.from_numpy(ex.boxes.astype(np.float32))
            region_text[b, :k] = ex.tokens[1:]
            region_mask[b, :k] = True
    return {
        "images": torch.stack([ex.image for ex in examples]),     # [B, 3, S, S]
        "text": torch.stack([ex.tokens[0] for ex in examples]),   # [B, L]
        "region_boxes": region_boxes,                             # [B, R, 4]
        "region_text": region_text,                               # [B, R, L]
        "region_mask": region_mask,                               # [B, R]
        "labels": torch.tensor([ex.label for ex in examples], dtype=torch.long),  # [B]
        "keys": [ex.key for ex in examples],
    }
