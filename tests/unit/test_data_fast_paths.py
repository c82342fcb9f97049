"""The pipeline's fast paths equal their references: reduced-size JPEG decode (boxes included),
torch resize vs PIL, the lean tar reader vs tarfile, the tokenizer caches, uint8 batches
normalised on the device."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer.data import normalize_on_device
from trainer.data.config import CLIP_MEAN, CLIP_STD, DataConfig, DataConfigError
from trainer.data.counters import DataCounters
from trainer.data.pipeline import build_train_loader
from trainer.data.sources import FASHION_MNIST_ROOT, synthetic_scenes
from trainer.data.stream import _tar_members, _tarfile_members, read_shard
from trainer.data.tokenizer import ClipBPETokenizer, _clean
from trainer.data.urls import expand_urls
from trainer.data.transforms import Boxes, ImageTransform, resized_crop, sample_crop
from trainer.data.writer import write_shards


def _jpeg(img: Image.Image, quality: int = 95) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))  # opened, not decoded: draft can act


def _rect_image(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255))
    return img


def _found(pixels: torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(pixels[0].numpy() > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


# ------------------------------------------------------------------ reduced-size JPEG decode

def test_draft_eval_boxes_hand_computed_and_match_full_decode():
    # 800x600, S=224: resize short side -> 298x224, center crop left=37: the window is
    # x 99.33..700.67, y 0..600 (stored px). 601 px wide / 2 >= 224 but / 4 < 224: decode at 1/2.
    box = (200, 150, 600, 450)
    src = _rect_image(800, 600, box)
    t = ImageTransform(size=224, train=False, min_visibility=0.5, min_size=2)
    p = t.place(_jpeg(src))
    assert p.draft == 2 and p.pixels.shape == (3, 224, 224) and p.pixels.dtype == torch.uint8
    kept, keep = t.boxes(p, np.array([box], dtype=float))
    # window in decoded px: x round(49.67)=50 .. round(350.33)=350, y 0..300 -> scale 224/600
    s, tx = 224 / 600, -50 * 224 / 300
    np.testing.assert_allclose(kept[0], [200 * s + tx, 150 * s, 600 * s + tx, 450 * s], atol=1e-9)
    full = ImageTransform(size=224, train=False, jpeg_draft=False)
    pf = full.place(_jpeg(src))
    assert pf.draft == 1
    kept_full, _ = full.boxes(pf, np.array([box], dtype=float))
    np.testing.assert_allclose(kept[0], kept_full[0], atol=1.0)          # draft vs full decode
    np.testing.assert_allclose(_found(p.pixels), kept[0], atol=1.5)      # boxes follow pixels
    np.testing.assert_allclose(_found(pf.pixels), kept_full[0], atol=1.5)


@pytest.mark.parametrize("seed", range(4))
def test_draft_train_crop_same_window_boxes_within_1px(seed):
    rng = random.Random(seed)
    W, H = rng.randint(700, 1100), rng.randint(700, 1100)
    x0, y0 = rng.randint(50, W // 2), rng.randint(50, H // 2)
    box = (x0, y0, rng.randint(x0 + 150, W - 20), rng.randint(y0 + 150, H - 20))
    src = _rect_image(W, H, box)
    kw = dict(size=96, train=True, scale=(0.5, 1.0), hflip_prob=0.5, min_visibility=0.05, min_size=1)
    draft, full = ImageTransform(**kw), ImageTransform(**kw, jpeg_draft=False)
    pd, pf = draft.place(_jpeg(src), random.Random(seed)), full.place(_jpeg(src), random.Random(seed))
    assert pd.draft >= 2 and pf.draft == 1 and pd.flip == pf.flip
    kd, keep_d = draft.boxes(pd, np.array([box], dtype=float))
    kf, keep_f = full.boxes(pf, np.array([box], dtype=float))
    assert keep_d.tolist() == keep_f.tolist()
    if keep_d[0]:
        np.testing.assert_allclose(kd[0], kf[0], atol=1.0)
        np.testing.assert_allclose(_found(pd.pixels), kd[0], atol=1.5)


def test_torch_resize_matches_pil_reference():
    """No draft, integer crop: same boxes as the PIL ops; pixels within 2 grey levels inside
    (PIL's filter also reads pixels just outside the window, torch's does not: the outer rows
    and columns differ a little more)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((160, 120), Image.BICUBIC)  # smooth content
    box = np.array([[40.0, 30.0, 120.0, 90.0]])
    for interp in ("bicubic", "bilinear"):
        t = ImageTransform(size=64, train=True, scale=(0.3, 0.9), interpolation=interp,
                           min_visibility=0.0, min_size=0.0)
        p = t.place(img, random.Random(3))
        crop = sample_crop(160, 120, t.scale, t.ratio, random.Random(3))
        ref, ref_boxes = resized_crop(img, Boxes.of(box), crop, 64, 64, interp)
        diff = np.abs(p.pixels.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int))
        inner = diff[2:-2, 2:-2]
        assert inner.max() <= 2 and diff.mean() < 0.1, (interp, inner.max(), diff.mean())
        kept, _ = t.boxes(p, box)
        np.testing.assert_allclose(kept, ref_boxes.finish(0.0, 0.0)[0], atol=1e-9)


def test_fast_boxes_equal_boxes_reference():
    t = ImageTransform(size=224, train=True)
    rng = random.Random(0)
    for _ in range(300):
        xy = np.array([[a := rng.uniform(-50, 600), b := rng.uniform(-50, 600),
                        a + rng.uniform(0.1, 300), b + rng.uniform(0.1, 300)]
                       for _ in range(rng.randint(0, 6))]).reshape(-1, 4)
        p = t.place(Image.new("RGB", (rng.randint(230, 700), rng.randint(230, 700))), rng)
        t.min_visibility, t.min_size = rng.random(), rng.choice([0.0, 2.0])
        ref = Boxes.of(xy).affine(p.sx, p.sy, p.tx, p.ty).clip(224, 224)
        ref = ref.hflip(224) if p.flip else ref
        kept, keep = t.boxes(p, xy)
        rk, rkeep = ref.finish(t.min_visibility, t.min_size)
        assert np.array_equal(keep, rkeep) and np.array_equal(kept, rk)


# ------------------------------------------------------------------ tar reader

def _tar_bytes(fmt: int, names: list[str], seed: int = 0) -> tuple[bytes, list[tuple[str, bytes]]]:
    rng = random.Random(seed)
    buf, files = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        tar.addfile(link)
        for n in names:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 1500)))
            info = tarfile.TarInfo(n)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes tarfile write pax headers
            tar.addfile(info, io.BytesIO(data))
            files.append((n, data))
    return buf.getvalue(), files


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_lean_tar_reader_equals_tarfile(fmt):
    names = ["a.jpg", "a.txt", "dir/" + "x" * 120 + "/k.txt", "d" * 90 + "/" + "e" * 90 + ".json"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ünï/cødé.txt", "l" * 300 + ".txt"]
    raw, files = _tar_bytes(fmt, names)
    fast = list(_tar_members(io.BytesIO(raw[512:]), raw[:512]))
    assert fast == list(_tarfile_members(io.BytesIO(raw))) == files
    for cut in (len(raw) // 3, 700, 512 * 3 + 5):  # truncated: an error, as with tarfile
        with pytest.raises(tarfile.ReadError):
            list(_tar_members(io.BytesIO(raw[512:cut]), raw[:512]))
        with pytest.raises(tarfile.ReadError):
            list(_tarfile_members(io.BytesIO(raw[:cut])))


def test_read_shard_bad_checksum_compressed_and_empty(tmp_path):
    samples = {f"k{i}": {"txt": f"caption {i}".encode(), "cls": str(i).encode()} for i in range(4)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    plain, gz = tmp_path / "s.tar", tmp_path / "s.tar.gz"
    plain.write_bytes(raw)
    gz.write_bytes(gzip.compress(raw))
    want = [{"__key__": k, "__url__": None, **v} for k, v in samples.items()]
    for path in (plain, gz):  # gz goes through tarfile
        got = list(read_shard(str(path)))
        assert [{**s, "__url__": None} for s in got] == want
    # corrupt the 6th header (k2.cls; each member is one header + one data block): k0 and k1
    # come out (k1 once k2 starts), k2 is lost with the rest of the shard, as with tarfile
    bad = bytearray(raw)
    bad[5 * 1024 + 10] ^= 0xFF
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    out = []
    with pytest.raises(tarfile.ReadError, match="checksum"):
        for s in read_shard(str(tmp_path / "bad.tar")):
            out.append(s["__key__"])
    assert out == ["k0", "k1"]
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(tarfile.ReadError):
        list(read_shard(str(tmp_path / "empty.tar")))


# ------------------------------------------------------------------ tokenizer caches

@pytest.fixture(scope="module")
def tok() -> ClipBPETokenizer:
    return ClipBPETokenizer(context_length=16)


def test_row_cache_returns_identical_ids(tok):
    texts = ["a red circle", "A  Red circle ", "caf\u00e9 &amp; cr\u00e8me", "x " * 40, ""]
    first = tok(texts)
    again = tok(texts)  # cached rows
    fresh = ClipBPETokenizer(context_length=16)
    uncached = torch.tensor([list(fresh._row_ids_uncached(t)) + [0] * (16 - len(fresh._row_ids_uncached(t)))
                             for t in texts])
    assert torch.equal(first, again) and torch.equal(first, uncached)
    assert tok._rows.cache_info().hits >= len(texts)
    clone = pickle.loads(pickle.dumps(tok))  # caches are rebuilt, not pickled
    assert torch.equal(clone(texts), first)


def test_ascii_fast_path_equals_ftfy_path():
    ftfy = pytest.importorskip("ftfy")
    import html
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "\x1b", "\x07", "\u00e9", "\u2019"]
    cases = ["Don't STOP  me now!", "a&amp;b", "&lt;b&gt;", "naïve café", "\x1b[31mred\x1b[0m", "ﬁne"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    for t in cases:
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(t))).strip().split()).lower()
        assert _clean(t) == slow, repr(t)


# ------------------------------------------------------------------ uint8 batches

@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """Larger JPEGs than the output, so the draft path runs in the pipeline."""
    d = tmp_path_factory.mktemp("big")
    return write_shards(synthetic_scenes(24, seed=2, size=160, max_shapes=3), d, "big", 6).pattern()


def _cfg(pattern: str, **kw) -> DataConfig:
    cfg = DataConfig(train_urls=pattern, batch_size=4, workers=0, image_size=48, max_regions=3,
                     shuffle_buffer=5, drop_last=False, seed=7)
    cfg.tokenizer.context_length = 16
    cfg.augment.scale_min, cfg.augment.hflip_prob = 0.6, 0.5
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_device_normalize_gives_uint8_batches_equal_after_normalize(photo_shards):
    a = list(build_train_loader(_cfg(photo_shards), 0, 1))
    b = list(build_train_loader(_cfg(photo_shards, normalize="device"), 0, 1))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["images"].dtype == torch.float32 and y["images"].dtype == torch.uint8
        assert y["images"].shape == x["images"].shape == (4, 3, 48, 48)
        assert x["images"].is_contiguous() and y["images"].is_contiguous()  # plain NCHW
        assert torch.equal(normalize_on_device(y["images"], CLIP_MEAN, CLIP_STD), x["images"])
        assert normalize_on_device(x["images"], CLIP_MEAN, CLIP_STD) is x["images"]  # float: as is
        for k in ("text", "region_boxes", "region_text", "region_mask", "labels", "keys"):
            assert (x[k] == y[k]) if k == "keys" else torch.equal(x[k], y[k])
    with pytest.raises(DataConfigError, match="data.normalize"):
        _cfg(photo_shards, normalize="gpu").validate()


def test_draft_pipeline_deterministic_and_resumes_exactly(photo_shards):
    cfg = _cfg(photo_shards)
    full = list(build_train_loader(cfg, 0, 1))
    assert [torch.equal(x["images"], y["images"]) for x, y in
            zip(full, build_train_loader(cfg, 0, 1))] == [True] * len(full)
    loader = build_train_loader(cfg, 0, 1)
    it = iter(loader)
    next(it), next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])
        assert torch.equal(x["region_boxes"], y["region_boxes"])
    # the draft path really ran: 160 px scenes cropped to >= 0.6 area, output 48 -> scale 1/2
    t = ImageTransform(size=48, train=True, scale=(0.6, 1.0))
    sample = next(read_shard(expand_urls(photo_shards)[0]))
    assert t.place(Image.open(io.BytesIO(sample["jpg"])), random.Random(0)).draft == 2
    assert DataCounters(loader.counters.as_dict())["corrupt_image"] == 0


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT),
                    reason="Debian dataset-fashion-mnist not installed (apt-packages.txt)")
def test_fashion_mnist_box_regions_reach_the_batch(tmp_path):
    from trainer.data.sources import fashion_mnist

    sink = write_shards(fashion_mnist("test", count=8, size=32, regions="box"), tmp_path, "fm", 8)
    cfg = _cfg(sink.pattern(), image_size=32, max_regions=2, drop_last=True)
    cfg.augment.scale_min = 1.0
    cfg.augment.ratio_min = cfg.augment.ratio_max = 1.0
    cfg.augment.hflip_prob = 0.0
    for batch in build_train_loader(cfg, 0, 1):
        assert batch["region_mask"][:, 0].all() and not batch["region_mask"][:, 1].any()
        assert torch.equal(batch["region_text"][:, 0], batch["text"])  # region caption = caption
        b = batch["region_boxes"][:, 0]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and b.max() <= 1
