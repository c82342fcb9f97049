"""Sample sources for tools/make_shards.py: synthetic scenes, Fashion-MNIST, a folder of images.

Each yields sample dicts in the shard format ({"__key__", "jpg"|"png", "txt", "json", "cls"?})
ready for `writer.ShardSink`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- synthetic scenes

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245),
}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(f"image format {fmt!r}: expected jpg, png or webp")
    return buf.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel bounds for PIL; the region bbox is x1 + 1, y1 + 1
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def synthetic_scene(index: int, seed: int = 0, size: int = 64, min_shapes: int = 1,
                    max_shapes: int = 3, fmt: str = "jpg") -> dict:
    """One scene: non-overlapping coloured shapes on a dark noisy background.

    Caption lists the shapes left to right ("a red circle and a blue square"); one region per
    shape with its exact bounding box (xyxy pixels, exclusive end) and caption ("a red circle").
    Deterministic in (seed, index).
    """
    rng = np.random.default_rng([seed, index])
    bg = rng.integers(20, 60, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(min_shapes, max_shapes + 1))
    placed: list[tuple[int, int, int, int]] = []
    regions = []
    for _ in range(n):
        for _attempt in range(50):
            side = int(rng.integers(max(4, size // 6), max(5, size * 2 // 5) + 1))
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = (x0, y0, x0 + side, y0 + side)  # exclusive end
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                break
        else:
            continue
        placed.append(box)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        _draw_shape(draw, shape, (box[0], box[1], box[2] - 1, box[3] - 1), COLORS[color])
        regions.append({"bbox": [float(v) for v in box], "caption": f"a {color} {shape}", "score": 1.0})
    regions.sort(key=lambda r: (r["bbox"][0], r["bbox"][1]))
    caption = _join([r["caption"] for r in regions])
    key = f"scene{seed:04d}_{index:08d}"
    return {"__key__": key, fmt: _encode(img, fmt), "txt": caption,
            "json": {"caption": caption, "regions": regions}}


def synthetic_scenes(count: int, seed: int = 0, size: int = 64, min_shapes: int = 1,
                     max_shapes: int = 3, fmt: str = "jpg") -> Iterator[dict]:
    for i in range(count):
        yield synthetic_scene(i, seed, size, min_shapes, max_shapes, fmt)


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")
FASHION_MNIST_TEMPLATE = "a photo of a {}"
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def garment_box(img: Image.Image) -> list[float] | None:
    """Tight box (xyxy pixels, exclusive end) of the non-black pixels; None if all black."""
    a = np.asarray(img.convert("L"))
    ys, xs = np.nonzero(a > 0)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def fashion_mnist(split: str = "train", count: int = 0, offset: int = 0, size: int = 64,
                  root: str = FASHION_MNIST_ROOT, fmt: str = "png",
                  regions: str = "none") -> Iterator[dict]:
    """Real Fashion-MNIST images upscaled to `size` RGB, captioned "a photo of a {class}".

    Every sample carries its label in `.cls` and in the JSON ("label", "class_name"), so the
    test split serves as a class-labelled zero-shot eval split. ``regions="box"`` adds one
    region per image: the garment's tight box with the caption, for CLOC training.
    """
    if regions not in ("none", "box"):
        raise ValueError(f"regions={regions!r}: expected none or box")
    if split not in _FMNIST_FILES:
        raise ValueError(f"split={split!r}: expected train or test")
    img_file, lbl_file = (os.path.join(root, f) for f in _FMNIST_FILES[split])
    for p in (img_file, lbl_file):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: apt-get install dataset-fashion-mnist")
    images, labels = _read_idx(img_file), _read_idx(lbl_file)
    end = len(images) if count <= 0 else min(len(images), offset + count)
    for i in range(offset, end):
        label = int(labels[i])
        name = FASHION_MNIST_CLASSES[label]
        img = Image.fromarray(images[i], "L").resize((size, size), Image.BICUBIC).convert("RGB")
        caption = FASHION_MNIST_TEMPLATE.format(name)
        meta = {"caption": caption, "label": label, "class_name": name}
        box = garment_box(img) if regions == "box" else None
        if box is not None:
            meta["regions"] = [{"bbox": box, "caption": caption, "score": 1.0}]
        yield {"__key__": f"fmnist_{split}_{i:05d}", fmt: _encode(img, fmt), "txt": caption,
               "json": meta, "cls": label}


# ----------------------------------------------------------------------------- a folder of images

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def sample_key(name: str) -> str:
    """Key of an image file: its path without extension, dots and odd characters -> '_'."""
    stem = os.path.splitext(name)[0]
    return _KEY_UNSAFE.sub("_", stem).strip("/")


def read_captions(path: str) -> list[tuple[str, str]]:
    """(image file, caption) pairs from a CSV (header with image|file|filename|path and
    caption|text|title) or a JSONL ({"image"|"file": ..., "caption"|"text": ...}) file."""
    pairs: list[tuple[str, str]] = []
    img_cols, cap_cols = ("image", "file", "filename", "path"), ("caption", "text", "title")
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                img = next((row[c] for c in img_cols if c in row), None)
                cap = next((row[c] for c in cap_cols if c in row), None)
                if img is None or cap is None:
                    raise ValueError(f"{path}:{n}: needs one of {img_cols} and one of {cap_cols}")
                pairs.append((str(img), str(cap)))
        return pairs
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        img_col = next((c for c in img_cols if c in cols), None)
        cap_col = next((c for c in cap_cols if c in cols), None)
        if img_col is None or cap_col is None:
            raise ValueError(f"{path}: header {cols} needs one of {img_cols} and one of {cap_cols}")
        for row in reader:
            pairs.append((row[img_col], row[cap_col]))
    return pairs


def region_label_row(line: str, path: str, n: int) -> tuple[str, list] | None:
    """One JSONL line {"key"|"image": ..., "regions": [...]} -> (key, regions); None if blank.
    Errors name the file and line."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: not a JSON object")
    if "key" in row:
        key = str(row["key"])
    elif "image" in row:
        key = sample_key(str(row["image"]))
    else:
        raise ValueError(f"{path}:{n}: needs a 'key' or an 'image' field")
    regions = row.get("regions") or []
    if not isinstance(regions, list):
        raise ValueError(f"{path}:{n}: 'regions' must be a list")
    return key, regions


def read_region_labels(path: str) -> tuple[dict[str, list], int]:
    """JSONL {"key"|"image": ..., "regions": [...]} -> ({key: regions}, duplicate lines merged).
    Holds the whole file: for large files use trainer.data.region_index.RegionIndex."""
    out: dict[str, list] = {}
    duplicates = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = region_label_row(line, path, n)
            if row is None:
                continue
            key, regions = row
            if key in out:
                duplicates += 1
            out.setdefault(key, []).extend(regions)
    return out, duplicates


def folder_samples(images_dir: str, captions_file: str, regions_file: str | None = None,
                   stats: dict | None = None) -> Iterator[dict]:
    """Samples from image files + captions (+ region JSONL keyed by sample key or image name).

    JPEG/PNG/WebP bytes are stored as they are; other formats are re-encoded to PNG. Missing or
    unreadable images are skipped and counted in `stats`.
    """
    stats = stats if stats is not None else {}
    regions, _ = read_region_labels(regions_file) if regions_file else ({}, 0)
    for name, caption in read_captions(captions_file):
        path = Path(images_dir) / name
        key = sample_key(name)
        if not path.is_file():
            stats["missing_image"] = stats.get("missing_image", 0) + 1
            continue
        data = path.read_bytes()
        ext = path.suffix.lower().lstrip(".")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                if fmt not in ("jpeg", "png", "webp"):
                    data, ext = _encode(im.convert("RGB"), "png"), "png"
                else:
                    ext = {"jpeg": "jpg"}.get(fmt, fmt)
        except Exception:
            stats["corrupt_image"] = stats.get("corrupt_image", 0) + 1
            continue
        sample = {"__key__": key, ext: data, "txt": caption.strip()}
        if key in regions:
            sample["json"] = {"caption": caption.strip(), "regions": regions[key]}
            stats["with_regions"] = stats.get("with_regions", 0) + 1
        stats["written"] = stats.get("written", 0) + 1
        yield sample
