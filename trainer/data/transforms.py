"""Box-aware image transforms: every crop / resize / flip moves the boxes with the pixels.

Boxes are xyxy in pixels of the current image. Each op maps them with the same axis-aligned
affine map as the pixels. `Boxes` keeps two copies: `full` (mapped, never clipped) and `vis`
(clipped to the image after each crop); `finish` drops a box whose visible part is below a
fraction of its mapped area or thinner than a few output pixels.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass
class Boxes:
    full: np.ndarray  # [n, 4] mapped, unclipped
    vis: np.ndarray   # [n, 4] mapped, clipped to every crop so far

    @classmethod
    def of(cls, xyxy: np.ndarray) -> "Boxes":
        xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        return cls(xyxy.copy(), xyxy.copy())

    def affine(self, sx: float, sy: float, tx: float, ty: float) -> "Boxes":
        """x' = sx * x + tx, y' = sy * y + ty (sx, sy > 0)."""
        m = np.array([sx, sy, sx, sy]), np.array([tx, ty, tx, ty])
        return Boxes(self.full * m[0] + m[1], self.vis * m[0] + m[1])

    def clip(self, width: float, height: float) -> "Boxes":
        vis = self.vis.copy()
        vis[:, 0::2] = vis[:, 0::2].clip(0, width)
        vis[:, 1::2] = vis[:, 1::2].clip(0, height)
        return Boxes(self.full, vis)

    def hflip(self, width: float) -> "Boxes":
        def flip(b: np.ndarray) -> np.ndarray:
            return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
        return Boxes(flip(self.full), flip(self.vis))

    def finish(self, min_visibility: float, min_size: float) -> tuple[np.ndarray, np.ndarray]:
        """(kept visible boxes [k, 4], keep mask [n]) after the visibility / size rules."""
        w = self.vis[:, 2] - self.vis[:, 0]
        h = self.vis[:, 3] - self.vis[:, 1]
        full_area = (self.full[:, 2] - self.full[:, 0]) * (self.full[:, 3] - self.full[:, 1])
        vis_area = w.clip(0) * h.clip(0)
        keep = (w >= max(min_size, 1e-6)) & (h >= max(min_size, 1e-6))
        keep &= vis_area >= min_visibility * full_area
        return self.vis[keep], keep


# ---------------------------------------------------------------------------- elementary ops

def resized_crop(img: Image.Image, boxes: Boxes, crop: tuple[float, float, float, float],
                 out_w: int, out_h: int, interpolation: str = "bicubic") -> tuple[Image.Image, Boxes]:
    """Crop `crop` = (x0, y0, w, h) from `img` and resize it to out_w x out_h, in one resample."""
    x0, y0, w, h = crop
    out = img.resize((out_w, out_h), _RESAMPLE[interpolation], box=(x0, y0, x0 + w, y0 + h))
    sx, sy = out_w / w, out_h / h
    return out, boxes.affine(sx, sy, -x0 * sx, -y0 * sy).clip(out_w, out_h)


def resize_short_side(img: Image.Image, boxes: Boxes, size: int, interpolation: str = "bicubic"
                      ) -> tuple[Image.Image, Boxes]:
    """Resize so the shorter side is `size` (long side int(size * long / short), as torchvision)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    out = img.resize((new_w, new_h), _RESAMPLE[interpolation])
    return out, boxes.affine(new_w / w, new_h / h, 0.0, 0.0)


def center_crop(img: Image.Image, boxes: Boxes, size: int) -> tuple[Image.Image, Boxes]:
    """Crop the central size x size window (offsets rounded as torchvision's CenterCrop)."""
    w, h = img.size
    if w < size or h < size:  # upscale first (never happens after resize_short_side)
        img, boxes = resized_crop(img, boxes, (0, 0, w, h), max(w, size), max(h, size))
        w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    out = img.crop((left, top, left + size, top + size))
    return out, boxes.affine(1.0, 1.0, -left, -top).clip(size, size)


def hflip(img: Image.Image, boxes: Boxes) -> tuple[Image.Image, Boxes]:
    return img.transpose(Image.FLIP_LEFT_RIGHT), boxes.hflip(img.width)


def sample_crop(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: random.Random) -> tuple[int, int, int, int]:
    """A random-resized-crop window (x0, y0, w, h), torchvision's algorithm with our RNG."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# ---------------------------------------------------------------------------- full transforms

@dataclass
class ImageTransform:
    """Training (random resized crop + flip) or evaluation (resize + center crop) transform,
    then CLIP normalisation. Returns the image tensor [3, S, S], the kept boxes normalised to
    [0, 1] of the output image [k, 4], and the keep mask over the input boxes [n]."""

    size: int
    train: bool
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip_prob: float = 0.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_visibility: float = 0.5
    min_size: float = 2.0

    def geometry(self, img: Image.Image, xyxy: np.ndarray, rng: random.Random | None
                 ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """PIL image [S x S], kept boxes in output pixels [k, 4], keep mask [n]."""
        boxes = Boxes.of(xyxy)
        if self.train:
            rng = rng or random.Random(0)
            crop = sample_crop(img.width, img.height, self.scale, self.ratio, rng)
            img, boxes = resized_crop(img, boxes, crop, self.size, self.size, self.interpolation)
            if self.hflip_prob > 0 and rng.random() < self.hflip_prob:
                img, boxes = hflip(img, boxes)
        else:
            img, boxes = resize_short_side(img, boxes, self.size, self.interpolation)
            img, boxes = center_crop(img, boxes, self.size)
        kept, keep = boxes.finish(self.min_visibility, self.min_size)
        return img, kept, keep

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """(x / 255 - mean) / std as one multiply-add: x * (1 / (255 std)) - mean / std."""
        if not hasattr(self, "_scale"):
            std, mean = torch.tensor(self.std).view(3, 1, 1), torch.tensor(self.mean).view(3, 1, 1)
            self._scale, self._offset = 1.0 / (255.0 * std), -mean / std
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W] uint8
        return torch.addcmul(self._offset, x.to(torch.float32), self._scale)  # [3, H, W] float32

    def __call__(self, img: Image.Image, xyxy: np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        out, kept, keep = self.geometry(img, xyxy, rng)
        return self.to_tensor(out), kept / float(self.size), keep
