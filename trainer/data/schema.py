"""The shard sample schema (see README.md) and its tolerant decoder.

A raw sample is what a tar holds for one key: {"__key__", "__url__", "jpg"|"png"|..., "txt",
"json"?, "cls"?} with bytes values. `decode_sample` turns it into a `Decoded` sample or raises
`SkipSample(reason)`; repairs (clamped boxes, dropped regions) are counted on the way.
Which fields hold what is written once here (`image_bytes`, `sample_meta`, `sample_caption`),
for tools that read raw samples without decoding them (vesl/label.py).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from trainer.data.counters import DataCounters

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    key: str
    image: Any                              # RGB PIL image, or what `decode_sample(load=...)` made
    caption: str
    boxes: np.ndarray                       # [n, 4] float64 xyxy pixels of the stored image
    region_captions: list[str] = field(default_factory=list)
    region_scores: list[float] = field(default_factory=list)
    label: int = -1                         # class label for eval splits (.cls or json "label")


def open_image(data: bytes) -> Image.Image:
    """Open an image from its bytes, reading the header only (size, mode, format)."""
    if not data:
        raise SkipSample("corrupt_image", "empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise SkipSample("corrupt_image", f"size {img.size}")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image (now: truncated files fail here) as RGB."""
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return img


def decode_image(data: bytes) -> Image.Image:
    """The fully decoded RGB image of `data` (SkipSample("corrupt_image") when it fails)."""
    return load_rgb(open_image(data))


def _text(data: bytes | None) -> str:
    if not data:
        return ""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").strip()


def image_bytes(raw: dict) -> bytes | None:
    """The bytes of a raw sample's image (the first of IMAGE_EXTS it holds), or None."""
    return next((raw[e] for e in IMAGE_EXTS if e in raw), None)


def sample_meta(raw: dict, counters: DataCounters | None = None, where: str = "") -> dict:
    """A raw sample's JSON metadata: {} when it has no .json or an unreadable one (counted as
    "malformed_json" in `counters` when given)."""
    data = raw.get("json")
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        if counters is not None:
            counters.record("malformed_json", where, str(e)[:80])
        return {}
    if not isinstance(meta, dict):
        if counters is not None:
            counters.record("malformed_json", where, f"top level is {type(meta).__name__}")
        return {}
    return meta


def sample_caption(raw: dict, meta: dict) -> str:
    """A raw sample's caption: its .txt, else its JSON's "caption" (`meta`: `sample_meta(raw)`),
    stripped; "" when neither holds text."""
    caption = _text(raw.get("txt"))
    if not caption and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    return caption


def _finite_box(bbox) -> list[float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        out = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def parse_regions(meta: dict, width: int, height: int, counters: DataCounters, where: str
                  ) -> tuple[np.ndarray, list[str], list[float]]:
    """Validate `meta["regions"]` against the stored image size; clamp or drop bad boxes."""
    regions = meta.get("regions") or []
    if not isinstance(regions, list):
        counters.record("region_malformed", where, "regions is not a list")
        return np.zeros((0, 4)), [], []
    boxes, caps, scores = [], [], []
    for r in regions:
        box = _finite_box(r.get("bbox")) if isinstance(r, dict) else None
        cap = r.get("caption") if isinstance(r, dict) else None
        if box is None or not isinstance(cap, str) or not cap.strip():
            counters.record("region_malformed", where, repr(r)[:80])
            continue
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            counters.record("box_inverted", where, f"{box}")
            continue
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            counters.record("box_outside", where, f"{box} in {width}x{height}")
            continue
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            counters.record("box_clamped", where, f"{box} in {width}x{height}")
            x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        score = r.get("score", 1.0)
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else 1.0
        boxes.append((x0, y0, x1, y1))
        caps.append(cap.strip())
        scores.append(score)
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return arr, caps, scores


def decode_sample(raw: dict, counters: DataCounters, want_regions: bool = True,
                  load: Callable[[Image.Image], Any] = load_rgb,
                  labelled_without_caption: bool = False) -> Decoded:
    """Decode one raw sample. `load` turns the opened image (header read, pixels not yet
    decoded) into `Decoded.image`; it runs before the regions are parsed, against the stored
    image size, and may raise SkipSample (the pipeline passes a transform that decodes at the
    resolution its crop needs). A sample without a caption is skipped ("missing_caption"),
    unless ``labelled_without_caption`` and it carries a class label (an eval set's image +
    ``cls`` classification sample: its caption is then "")."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    data = image_bytes(raw)
    if data is None:
        raise SkipSample("missing_image", f"fields {sorted(k for k in raw if not k.startswith('__'))}")
    meta = sample_meta(raw, counters, where)
    caption = sample_caption(raw, meta)
    label = -1
    if "cls" in raw:
        try:
            label = int(_text(raw["cls"]))
        except ValueError:
            label = -1
    elif isinstance(meta.get("label"), int) and not isinstance(meta.get("label"), bool):
        label = meta["label"]
    if not caption and not (labelled_without_caption and label >= 0):
        raise SkipSample("missing_caption")
    opened = open_image(data)
    width, height = opened.size
    image = load(opened)
    if want_regions and meta.get("regions") is not None:
        boxes, caps, scores = parse_regions(meta, width, height, counters, where)
    else:
        boxes, caps, scores = np.zeros((0, 4)), [], []
    return Decoded(key, image, caption, boxes, caps, scores, label)
