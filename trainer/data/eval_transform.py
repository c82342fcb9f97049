"""The reference evaluation transform: OpenAI CLIP's / open_clip's preprocessing, step for step.

open_clip's ``image_transform(S, is_train=False)`` (which reproduces OpenAI's preprocessing
array exactly) runs, on the fully decoded image in its stored mode:

1. resize with PIL so the short side is S, the long side ``int(S * long / short)`` (torchvision
   ``Resize(S)``; PIL's own rules apply: "P" and "1" images resample NEAREST, "RGBA"/"LA" with
   premultiplied alpha, "CMYK" in CMYK);
2. center crop S x S at ``int(round((side - S) / 2))`` (torchvision ``CenterCrop``);
3. ``convert("RGB")`` (after the resize: RGBA drops alpha, L repeats, CMYK and palettes map);
4. to tensor / 255 and normalise.

`ReferenceEvalTransform` makes these same PIL calls and hands the uint8 pixels to the
pipeline, which normalises them as ``x * (1 / (255 std)) - mean / std`` in float32: equal to
open_clip's float32 ``(x / 255 - mean) / std`` within 1e-6 (tests/unit/test_eval_transform.py).
Region boxes take the exact affine map of the resize and crop.

It is the default of every evaluation path (``data.augment.eval_resize=reference``). The
training path's one-pass transform (`ImageTransform`: JPEG draft decoding, crop window snapped
to the decoded pixel grid, torch's antialiased resize) is faster but not the reference; its
deviation is measured in trainer/data/README.md ("Evaluation preprocessing").
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from trainer.data.schema import SkipSample
from trainer.data.transforms import RESAMPLE, ImageTransform, Placement


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new width, new height) with the short side ``size`` (torchvision ``Resize(int)``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class ReferenceEvalTransform(ImageTransform):
    """`ImageTransform(train=False)` with open_clip's exact eval preprocessing (module
    docstring). ``place`` returns the S x S uint8 pixels and the stored-pixel -> output map."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "train": False, "jpeg_draft": False})

    def place(self, img: Image.Image, rng: random.Random | None = None) -> Placement:
        S = self.size
        try:
            img.load()  # the full decode (no JPEG draft)
            w, h = img.size
            new_w, new_h = short_side_size(w, h, S)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), RESAMPLE[self.interpolation])
            left, top = int(round((new_w - S) / 2.0)), int(round((new_h - S) / 2.0))
            img = img.crop((left, top, left + S, top + S)).convert("RGB")
            pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())    # [S, S, 3]
        except Exception as e:  # truncated or undecodable pixels, unsupported modes
            raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
        return Placement(pixels.permute(2, 0, 1), new_w / w, new_h / h, -float(left),
                         -float(top), False, 1)                                  # [3, S, S]
