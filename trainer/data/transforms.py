"""Box-aware image transforms: every crop / resize / flip moves the boxes with the pixels.

Boxes are xyxy in pixels of the current image. Each op maps them with the same axis-aligned
affine map as the pixels. `Boxes` keeps two copies: `full` (mapped, never clipped) and `vis`
(clipped to the image after each crop); `finish` drops a box whose visible part is below a
fraction of its mapped area or thinner than a few output pixels.

The elementary PIL ops below are the reference. `ImageTransform`, which the pipeline runs, does
the same geometry in one pass: it chooses the source window (in stored-image pixels) from the
image size alone, decodes a JPEG only at the resolution that window needs (DCT scaling), and
resizes the window to S x S with torch's antialiased uint8 kernels (PIL's filters: within 2
grey levels, a little more on the outermost rows and columns, where PIL's filter also reads
pixels just outside the window); the boxes take the exact affine map of the pixels that were
actually resampled.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.normalize import normalize_coefficients
from trainer.data.schema import load_rgb

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


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
    out = img.resize((out_w, out_h), RESAMPLE[interpolation], box=(x0, y0, x0 + w, y0 + h))
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
    out = img.resize((new_w, new_h), RESAMPLE[interpolation])
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

DRAFT_SCALES = (8, 4, 2, 1)
_TORCH_MODE = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


def draft_scale(window_w: float, window_h: float, out_w: int, out_h: int) -> int:
    """The largest JPEG DCT scale 1/k (k in 8, 4, 2, 1) keeping >= out pixels in the window."""
    for k in DRAFT_SCALES:
        if window_w / k >= out_w and window_h / k >= out_h:
            return k
    return 1


def draft_decode(img: Image.Image, k: int) -> tuple[Image.Image, int]:
    """Ask the JPEG decoder for a 1/k-size decode; (image, the scale it will decode at).

    Decoded pixel i covers stored pixels [i k, (i + 1) k): stored coordinate = k * decoded.
    Non-JPEG or already loaded images are returned as they are (scale 1).
    """
    if k <= 1 or img.format != "JPEG" or getattr(img, "decoderconfig", None):
        return img, 1
    w, h = img.size
    # PIL picks scale = largest power of 2 <= min(w // req_w, h // req_h); w // (w // k) is in [k, 2k)
    res = img.draft("RGB", (max(1, w // k), max(1, h // k)))
    if res is None:
        return img, 1
    got = round(w / res[1][2])
    return img, got if got in DRAFT_SCALES else 1


@dataclass
class Placement:
    """The output pixels and the affine map stored-image pixels -> output pixels."""

    pixels: torch.Tensor   # [3, S, S] uint8 (strided: not necessarily contiguous)
    sx: float              # x_out = sx * x + tx (before the flip)
    sy: float
    tx: float
    ty: float
    flip: bool
    draft: int             # JPEG decode scale 1/draft used


@dataclass
class ImageTransform:
    """Training (random resized crop + flip) or evaluation (resize + center crop) transform.

    `place` gives the uint8 output pixels and the map of stored pixels to them; `boxes` maps
    boxes through it. Calling the transform returns the CLIP-normalised image tensor [3, S, S],
    the kept boxes normalised to [0, 1] of the output image [k, 4] and the keep mask over the
    input boxes [n].
    """

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
    jpeg_draft: bool = True

    def window(self, width: int, height: int, rng: random.Random | None
               ) -> tuple[tuple[float, float, float, float], bool]:
        """The stored-image rectangle (x0, y0, x1, y1) that becomes the S x S output, and the flip.

        Training: torchvision's random-resized-crop sample, then the flip draw (the RNG is used
        exactly as by `sample_crop` + `rng.random()`). Evaluation: the window that resizing the
        short side to S (long side int(S * long / short)) and center-cropping S x S keeps.
        """
        S = self.size
        if self.train:
            rng = rng or random.Random(0)
            x0, y0, w, h = sample_crop(width, height, self.scale, self.ratio, rng)
            flip = self.hflip_prob > 0 and rng.random() < self.hflip_prob
            return (float(x0), float(y0), float(x0 + w), float(y0 + h)), flip
        if width <= height:
            new_w, new_h = S, int(S * height / width)
        else:
            new_w, new_h = int(S * width / height), S
        left, top = int(round((new_w - S) / 2.0)), int(round((new_h - S) / 2.0))
        sx, sy = new_w / width, new_h / height
        return (left / sx, top / sy, (left + S) / sx, (top + S) / sy), False

    def place(self, img: Image.Image, rng: random.Random | None = None) -> Placement:
        """Decode `img` (opened, possibly not yet loaded) into the S x S output window.

        Raises SkipSample("corrupt_image") when the pixels do not decode.
        """
        window, flip = self.window(img.width, img.height, rng)
        rgb, k = self.decode(img, window)
        return self.resample(rgb, k, window, flip)

    def decode(self, img: Image.Image, window: tuple[float, float, float, float]
               ) -> tuple[Image.Image, int]:
        """(the decoded RGB image, its JPEG scale k: stored pixel = k * decoded pixel)."""
        x0, y0, x1, y1 = window
        k = draft_scale(x1 - x0, y1 - y0, self.size, self.size) if self.jpeg_draft else 1
        img, k = draft_decode(img, k)
        return load_rgb(img), k

    def resample(self, rgb: Image.Image, k: int, window: tuple[float, float, float, float],
                 flip: bool) -> Placement:
        """Crop `window` (stored pixels) out of the 1/k-scale decode and resize it to S x S."""
        S = self.size
        x0, y0, x1, y1 = window
        dw, dh = rgb.size
        # the window in decoded pixels, snapped to the pixel grid (at most half a decoded pixel)
        ix0, iy0 = min(max(0, round(x0 / k)), dw - 1), min(max(0, round(y0 / k)), dh - 1)
        ix1, iy1 = max(ix0 + 1, min(dw, round(x1 / k))), max(iy0 + 1, min(dh, round(y1 / k)))
        # PIL keeps RGB as 4-byte pixels: cropping there and exporting RGBX are plain copies of
        # the window only, and torch's uint8 resize kernels work on 4-channel pixels natively
        ww, wh = ix1 - ix0, iy1 - iy0
        buf = bytearray(rgb.crop((ix0, iy0, ix1, iy1)).tobytes("raw", "RGBX"))
        x = torch.frombuffer(buf, dtype=torch.uint8).view(1, wh, ww, 4).permute(0, 3, 1, 2)
        if (wh, ww) != (S, S):                                               # [1, 4, wh, ww]
            mode = _TORCH_MODE[self.interpolation]
            x = F.interpolate(x, size=(S, S), mode=mode, antialias=mode != "nearest-exact")
        out = x[0, :3]   # [3, S, S] uint8, a view of 4-byte pixels: the collate copies it once
        if flip:
            out = out.flip(-1)
        return Placement(out, S / (ww * k), S / (wh * k), -ix0 * S / ww, -iy0 * S / wh, flip, k)

    def boxes(self, p: Placement, xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept boxes in output pixels [k, 4], keep mask [n]) for stored-image boxes [n, 4].

        `Boxes.affine(...).clip(S, S)`, `.hflip(S)` if flipped, `.finish(...)`, in plain Python:
        the same float operations in the same order (numpy costs more on a handful of boxes).
        """
        S = float(self.size)
        lo, vis_min = max(self.min_size, 1e-6), self.min_visibility
        sx, sy, tx, ty = p.sx, p.sy, p.tx, p.ty
        kept, keep = [], []
        for x0, y0, x1, y1 in np.asarray(xyxy, dtype=np.float64).reshape(-1, 4).tolist():
            fx0, fy0, fx1, fy1 = x0 * sx + tx, y0 * sy + ty, x1 * sx + tx, y1 * sy + ty
            vx0, vy0 = min(max(fx0, 0.0), S), min(max(fy0, 0.0), S)
            vx1, vy1 = min(max(fx1, 0.0), S), min(max(fy1, 0.0), S)
            if p.flip:
                fx0, fx1, vx0, vx1 = S - fx1, S - fx0, S - vx1, S - vx0
            vw, vh = vx1 - vx0, vy1 - vy0
            ok = vw >= lo and vh >= lo and vw * vh >= vis_min * ((fx1 - fx0) * (fy1 - fy0))
            keep.append(ok)
            if ok:
                kept.append((vx0, vy0, vx1, vy1))
        return np.array(kept, dtype=np.float64).reshape(-1, 4), np.array(keep, dtype=bool)

    def geometry(self, img: Image.Image, xyxy: np.ndarray, rng: random.Random | None
                 ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """PIL image [S x S], kept boxes in output pixels [k, 4], keep mask [n]."""
        p = self.place(img, rng)
        kept, keep = self.boxes(p, xyxy)
        return Image.fromarray(p.pixels.permute(1, 2, 0).numpy(), "RGB"), kept, keep

    def normalize(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [3, H, W] -> (x / 255 - mean) / std float32 [3, H, W], into `out` if given
        (`out` may be `pixels` itself when it is float32 holding 0..255: then in place)."""
        if not hasattr(self, "_scale"):
            self._scale, self._offset = normalize_coefficients(self.mean, self.std)
        if out is None:
            out = pixels.to(torch.float32)
        elif out is not pixels:
            out.copy_(pixels)
        return out.mul_(self._scale).add_(self._offset)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """A PIL image -> CLIP-normalised float32 [3, H, W]."""
        return self.normalize(torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1))

    def __call__(self, img: Image.Image, xyxy: np.ndarray, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        p = self.place(img, rng)
        kept, keep = self.boxes(p, xyxy)
        return self.normalize(p.pixels), kept / float(self.size), keep
