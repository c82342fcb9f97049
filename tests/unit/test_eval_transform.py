"""Evaluation preprocessing equals open_clip's ``image_transform(S, is_train=False)`` (the
reference that reproduces OpenAI's preprocessing) within 1e-6, through every eval path's own
code: the shard eval loader (the in-training hook and tools/evaluate.py --checkpoint), the
CSV eval set, and tools/evaluate.py --exported's config. Images are photo-like (smooth
gradients + noise), made here, of 7 sizes / aspect ratios in the modes RGB, RGBA, L, CMYK
JPEG and palette PNG. Also: the fast (training) path is NOT the reference, by how much."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

S = 224
TOL = 1e-6
# (width, height, mode, format): tall, wide, square, very tall, very wide, upscaled, odd
CASES = [(450, 655, "RGB", "JPEG"), (640, 480, "RGBA", "PNG"), (224, 224, "L", "JPEG"),
         (300, 1000, "CMYK", "JPEG"), (1001, 333, "P", "PNG"), (27, 20, "RGB", "PNG"),
         (225, 301, "RGB", "JPEG")]


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """[h, w, 4] uint8: smooth colour gradients and blobs + sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    chans = []
    for c in range(4):
        fx, fy, ph = rng.uniform(1, 6, 3)
        smooth = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x + ph)) * np.cos(2 * np.pi * fy * y)
        chans.append(smooth + rng.normal(0, 0.04, (h, w)))
    return (np.clip(np.stack(chans, -1), 0, 1) * 255).round().astype(np.uint8)


def encode(w: int, h: int, mode: str, fmt: str, seed: int) -> bytes:
    arr = photo(w, h, seed)
    img = Image.fromarray(arr, "RGBA").convert("RGB") if mode != "RGBA" else \
        Image.fromarray(arr, "RGBA")
    if mode in ("L", "CMYK"):
        img = img.convert(mode)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[tuple[str, str, bytes]]:
    """(key, extension, bytes) per case."""
    return [(f"img{i}", "jpg" if fmt == "JPEG" else "png", encode(w, h, mode, fmt, i))
            for i, (w, h, mode, fmt) in enumerate(CASES)]


def reference(images) -> torch.Tensor:
    import open_clip

    t = open_clip.image_transform(S, is_train=False)
    return torch.stack([t(Image.open(io.BytesIO(b))) for _, _, b in images])  # [N, 3, S, S]


def write_shard(path: Path, images) -> None:
    """Classification samples without a caption (image + cls), as clip_benchmark stores them."""
    with tarfile.open(path, "w") as tar:
        for i, (key, ext, data) in enumerate(images):
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def config(**eval_overrides):
    from trainer.config import load_config

    over = [f"data.image_size={S}", "data.workers=0", "data.eval_batch_size=4",
            f"model.vision.image_size={S}"]
    return load_config(overrides=over + [f"{k}={v}" for k, v in eval_overrides.items()])


def loader_images(cfg) -> tuple[torch.Tensor, list[str]]:
    """What the eval path hands the model: eval_batches, then embed's normalize_on_device."""
    from trainer.data.normalize import normalize_on_device
    from trainer.data import build_tokenizer
    from trainer.eval.embed import eval_batches

    a = cfg.data.augment
    batches = list(eval_batches(cfg, 0, 1, build_tokenizer(cfg.data.tokenizer)))
    imgs = torch.cat([normalize_on_device(b["images"], a.mean, a.std) for b in batches])
    return imgs, [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("normalize", ["loader", "device"])
def test_shard_eval_loader_equals_open_clip(tmp_path, images, normalize):
    """The in-training hook and tools/evaluate.py --checkpoint read shards through this."""
    write_shard(tmp_path / "0.tar", images)
    cfg = config(**{"data.eval_urls": str(tmp_path / "0.tar"), "data.normalize": normalize})
    got, keys = loader_images(cfg)
    assert keys == [k for k, _, _ in images]  # caption-less image + cls samples all kept
    want = reference(images)
    err = (got - want).abs().amax(dim=(1, 2, 3))
    assert float(err.max()) <= TOL, dict(zip(keys, err.tolist()))


def test_csv_eval_set_equals_open_clip(tmp_path, images):
    rows = []
    for key, ext, data in images:
        (tmp_path / f"{key}.{ext}").write_bytes(data)
        rows.append({"filepath": f"{key}.{ext}", "title": f"a photo of {key}"})
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "title"])
        w.writeheader()
        w.writerows(rows)
    got, _ = loader_images(config(**{"eval.csv": str(tmp_path / "val.csv")}))
    assert float((got - reference(images)).abs().max()) <= TOL


def test_exported_model_eval_config_equals_open_clip(tmp_path, images):
    """tools/evaluate.py --exported builds its data config from the export's config.json."""
    import dataclasses
    import sys

    from trainer import hub
    from trainer.config import ModelConfig
    from trainer.data.config import TokenizerConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import evaluate as cli

    model = ModelConfig()
    model.vision.image_size = S
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / hub.CONFIG_FILE).write_text(json.dumps({
        "format": hub.FORMAT, "format_version": hub.FORMAT_VERSION,
        "model": dataclasses.asdict(model), "tokenizer": dataclasses.asdict(TokenizerConfig()),
        "preprocess": {"image_size": S, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest"}}))
    write_shard(tmp_path / "0.tar", images)
    args = cli.parse_args(["--exported", str(tmp_path / "export"), "--eval-urls",
                           str(tmp_path / "0.tar"), "data.workers=0"])
    cfg, _ = cli.build_export_config(args)
    got, _ = loader_images(cfg)
    assert float((got - reference(images)).abs().max()) <= TOL


def test_fast_path_is_not_the_reference(tmp_path, images):
    """data.augment.eval_resize=fast (the training path's transform) deviates: by more than a
    grey level (1/255/std ~ 0.015) on these images; the reference path above does not."""
    write_shard(tmp_path / "0.tar", images)
    cfg = config(**{"data.eval_urls": str(tmp_path / "0.tar"),
                    "data.augment.eval_resize": "fast"})
    got, _ = loader_images(cfg)
    assert float((got - reference(images)).abs().max()) > 0.015
