"""tools/label_regions.py and trainer/data/vesl (VESL-style region labelling), in one process.

- noun phrases of captions, against hand-made lists;
- the array split: every shard in exactly one task, contiguous blocks;
- pixel space: a white box drawn in a stored image, found in the detector's input tensor made by
  transformers' own OWLv2 / OWL-ViT image processor, maps back onto the drawn box (within one
  detector-input pixel), for wide and tall images;
- `RegionDetector.detect` on a batch whose images have different phrase counts (padded
  queries) equals transformers' post_process_object_detection run image by image (1e-2 px,
  the rounding of the output), for OWLv2 and OWL-ViT;
- end to end on shards with a corrupt image, a caption-less and a phrase-less sample and a
  truncated shard: every sample kept, counts per reason exact, the regions decode for
  training untouched; resume redoes only the unfinished shard (a stale .tmp is overwritten)
  and gives the same bytes; other settings into the same --out are refused;
- the cheap checks first: a caption-less or phrase-less sample is counted under its reason
  with its image never decoded (corrupt bytes that would count as bad_image, a decode spy)
  and no detector call for it;
- bad flags (two inputs of one output name included): one line naming the flag, exit 2.
Detectors are tiny and randomly initialised (tests/tiny_detectors.py): no weights ship.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_detectors import build_detector
from tools import label_regions
from trainer.data.counters import DataCounters
from trainer.data.schema import decode_sample
from trainer.data.stream import read_shard
from trainer.data.vesl.detector import (DetectOptions, RegionDetector, geometry_of,
                                        to_stored_pixels)
from trainer.data.vesl.label import task_shards
from trainer.data.vesl.phrases import noun_phrases
from trainer.data.writer import ShardSink




@pytest.mark.parametrize("caption,expected", [
    ("a black cat sitting on a red sofa next to two small dogs",
     ["black cat", "red sofa", "two small dogs"]),
    ("A photo of a man in a blue shirt riding a bicycle down the street.",
     ["man", "blue shirt", "bicycle", "street"]),
    ("a large green triangle and a small red square on a white background",
     ["large green triangle", "small red square"]),
    ("The dog and the Dog. It is there!", ["dog"]),
    ("it is there", []),
    ("", []),
])
def test_noun_phrases(caption, expected):
    assert noun_phrases(caption) == expected
    assert noun_phrases(caption, max_phrases=1) == expected[:1]


def test_task_shards_split_every_shard_once():
    for n in range(10):
        urls = [f"s{i}" for i in range(n)]
        for count in range(1, 5):
            parts = [task_shards(urls, i, count) for i in range(count)]
            assert sum(parts, []) == urls  # in order, each once: contiguous blocks
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="task index 2 of 2"):
        task_shards(["a"], 2, 2)


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("detectors")
    return {"owlv2": build_detector(d / "owlv2", "owlv2"),
            "owlvit": build_detector(d / "owlvit", "owlvit", image_size=96),
            "confident": build_detector(d / "confident", "owlv2", score_shift=20.0)}


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
@pytest.mark.parametrize("size", [(150, 90), (90, 150)])
def test_known_box_maps_back_to_stored_pixels(detectors, kind, size):
    from transformers import AutoProcessor

    w, h = size
    box = (30, 20, 70, 60)                       # xyxy, stored pixels
    a = np.zeros((h, w, 3), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    ip = AutoProcessor.from_pretrained(detectors[kind]).image_processor
    x = ip(images=[Image.fromarray(a)], return_tensors="pt")["pixel_values"][0]  # [3, S, S]
    s = x.shape[-1]
    white = (x[0] * ip.image_std[0] + ip.image_mean[0]) > 0.5
    ys, xs = torch.nonzero(white, as_tuple=True)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # detector-input pixels
    cxcywh = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]]) / s
    got = to_stored_pixels(cxcywh, w, h, geometry_of(ip))[0]
    px = max(w, h) / s if geometry_of(ip) == "pad_square" else max(w / s, h / s)
    assert torch.allclose(got, torch.tensor(box, dtype=torch.float64), atol=1.01 * px), (got, box, px)


def _reference(model, processor, image, phrases, opts):
    """transformers' own post-processing, one image (no query padding), clipped to the stored
    image, small boxes dropped, by score."""
    inputs = processor(text=[phrases], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    r = processor.image_processor.post_process_object_detection(
        out, threshold=opts.score, target_sizes=[(image.height, image.width)])[0]
    b = r["boxes"].double()
    b[:, 0::2] = b[:, 0::2].clamp(0, image.width)
    b[:, 1::2] = b[:, 1::2].clamp(0, image.height)
    keep = ((b[:, 2] - b[:, 0]) >= opts.min_size) & ((b[:, 3] - b[:, 1]) >= opts.min_size)
    rows = [(float(s), phrases[int(lab)], bb.tolist())
            for s, lab, bb in zip(r["scores"][keep], r["labels"][keep], b[keep])]
    return sorted(rows, key=lambda t: -t[0])


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_detect_equals_transformers_post_processing(detectors, kind):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    det = RegionDetector(detectors[kind])
    model = AutoModelForZeroShotObjectDetection.from_pretrained(detectors[kind]).eval()
    processor = AutoProcessor.from_pretrained(detectors[kind])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in ((120, 70), (50, 90), (64, 64))]
    phrases = [["red circle", "blue square", "dog"], ["cat"], ["tree", "car"]]
    opts = DetectOptions(score=0.02, nms_iou=1.0, max_regions=0)  # no suppression
    got = det.detect(images, phrases, opts)
    total = 0
    for image, ps, regions in zip(images, phrases, got):
        ref = _reference(model, processor, image, ps, opts)
        assert [r["score"] for r in regions] == sorted((r["score"] for r in regions), reverse=True)
        assert len(regions) == len(ref), (regions, ref)
        # equal scores (a random head has some) may come in either order: compare sorted rows
        key = lambda t: ([round(v) for v in t[2]], t[1])  # noqa: E731
        ours = sorted(((r["score"], r["caption"], r["bbox"]) for r in regions), key=key)
        for (score, cap, bbox), (rscore, rcap, rbbox) in zip(ours, sorted(ref, key=key)):
            assert cap == rcap and abs(score - rscore) <= 1e-4
            assert np.allclose(bbox, rbbox, atol=5e-3), (bbox, rbbox)
        total += len(ref)
    assert total > 5  # the comparison saw boxes
    capped = det.detect(images, phrases, DetectOptions(score=0.02, nms_iou=0.3, max_regions=2))
    for full, few in zip(got, capped):
        assert len(few) <= 2 and [r["score"] for r in few] == sorted(
            (r["score"] for r in few), reverse=True)
        assert few[:1] == full[:1]  # NMS keeps the best box


def _jpeg(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_inputs(d: Path) -> list[Path]:
    d.mkdir()
    a = [{"__key__": "a0", "jpg": _jpeg(80, 50, 0), "txt": "a red car next to a small dog"},
         {"__key__": "a1", "jpg": b"\xff\xd8 not a jpeg", "txt": "a broken image of a cat"},
         {"__key__": "a2", "jpg": _jpeg(40, 60, 1)},
         {"__key__": "a3", "jpg": _jpeg(40, 40, 2), "txt": "it is there"},
         {"__key__": "a4", "png": _jpeg(30, 70, 3), "json": {"caption": "two birds on a wire",
          "regions": [{"bbox": [0, 0, 5, 5], "caption": "old"}]}}]
    b = [{"__key__": f"b{i}", "jpg": _jpeg(64, 48, 10 + i), "txt": f"a green tree and a house {i}"}
         for i in range(3)]
    paths = []
    for name, samples in (("s0", a), ("s1", b), ("s2", b)):
        with ShardSink(d, file_name=f"{name}.tar") as sink:
            for s in samples:
                sink.write(dict(s))
        paths.append(d / f"{name}.tar")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:len(data) // 2])  # truncated: its first samples survive
    return paths


def _run(args: list[str], capsys) -> tuple[int, dict, str]:
    rc = label_regions.main(args + ["--quiet"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_label_shards_counts_and_resume(tmp_path, detectors, capsys):
    shards = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--shards", str(tmp_path / "in"), "--detector", str(detectors["confident"]),
            "--out", str(out), "--score", "0.5", "--max-regions", "3", "--batch-size", "2"]
    rc, report, err = _run(args, capsys)
    assert rc == 0, err
    assert report["done"] == 3 and report["pending"] == 0
    assert report["bad_image"] == 1 and report["no_caption"] == 1 and report["no_phrase"] == 1
    assert len(report["read_errors"]) == 1 and "s2.tar" in report["read_errors"][0]
    labelled = report["labelled"]
    assert labelled == report["samples"] - 3 and labelled >= 5
    assert (out / "label_regions_report.json").is_file()
    # every readable input sample is in the output, in order, its files unchanged but the JSON
    for src in shards:
        before = list(_read_tolerant(src))
        after = list(read_shard(str(out / src.name)))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for x, y in zip(before, after):
            for ext in set(x) - {"__url__", "json"}:
                assert y[ext] == x[ext], (x["__key__"], ext)
            if x["__key__"] in ("a1", "a2"):
                assert y.get("json") == x.get("json")  # bad image / no caption: as it was
                continue
            meta = json.loads(y["json"])
            caption = meta["caption"]
            regions = meta["regions"]  # replace mode: a4's own region is gone
            if x["__key__"] == "a3":
                assert regions == []
                continue
            assert 1 <= len(regions) <= 3
            assert [r["score"] for r in regions] == sorted((r["score"] for r in regions), reverse=True)
            assert all(r["score"] > 0.5 and r["caption"] in noun_phrases(caption) for r in regions)
            counters = DataCounters()
            d = decode_sample(dict(y, __url__="x"), counters)
            assert len(d.boxes) == len(regions) and counters.as_dict() == {}, counters
            w, h = d.image.size
            assert (d.boxes[:, 2] > d.boxes[:, 0]).all() and (d.boxes[:, 3] > d.boxes[:, 1]).all()
            assert (d.boxes >= 0).all() and (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all()
    # resume: s1 lost its marker mid-write (a stale .tmp left); only s1 is labelled again
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    (out / "_done/s1.json").unlink()
    (out / "s1.tar.tmp").write_bytes(b"half a shard")
    rc, again, err = _run(args, capsys)
    assert rc == 0 and again == report, err
    assert err.count("done already, skipped") == 2 and "labelled " + str(shards[1]) in err
    assert not (out / "s1.tar.tmp").exists()
    for p in out.glob("*.tar"):
        assert p.read_bytes() == first[p.name][0]           # same labels, byte for byte
        assert (p.stat().st_mtime_ns == first[p.name][1]) == (p.name != "s1.tar")
    # the same --out with other settings is refused
    with pytest.raises(SystemExit) as e:
        label_regions.main([a if a != "0.5" else "0.4" for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "score=0.5 there, 0.4 now" in err, err


def _read_tolerant(path: Path):
    try:
        yield from read_shard(str(path))
    except tarfile.ReadError:
        return


BAD = [
    (["--score", "1.5"], "--score=1.5"),
    (["--nms-iou", "0"], "--nms-iou=0.0"),
    (["--max-regions", "-1"], "--max-regions=-1"),
    (["--task-index", "2", "--task-count", "2"], "--task-index=2 --task-count=2"),
    (["--prompt", "a photo"], "--prompt 'a photo'"),
    (["--detector", "{tmp}/nodir"], "--detector {tmp}/nodir"),
    (["--detector", "{tmp}/clip"], "model_type='clip'"),
    (["--shards", "{tmp}/none-{{0..1}}.tar"], "none-0.tar"),
    (["--shards", "{tmp}/in/s0.tar::{tmp}/in2/s0.tar"],
     "--shards: '{tmp}/in/s0.tar' and '{tmp}/in2/s0.tar' would both be written as s0.tar"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_flags_one_line(tmp_path, capsys, extra, message):
    _write_inputs(tmp_path / "in")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip/config.json").write_text('{"model_type": "clip"}')
    (tmp_path / "det").mkdir()
    (tmp_path / "det/config.json").write_text('{"model_type": "owlv2"}')
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2/s0.tar").write_bytes((tmp_path / "in/s0.tar").read_bytes())
    base = {"--shards": str(tmp_path / "in/s0.tar"), "--detector": str(tmp_path / "det"),
            "--out": str(tmp_path / "out")}
    extra = [a.format(tmp=tmp_path) for a in extra]
    for flag in extra[::2]:
        base.pop(flag, None)
    args = [x for kv in base.items() for x in kv] + extra + ["--quiet"]
    with pytest.raises(SystemExit) as e:
        label_regions.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message.format(tmp=tmp_path) in err, err


def test_no_caption_and_no_phrase_samples_are_never_decoded(tmp_path, detectors, monkeypatch):
    """A sample is counted under the first reason that applies, cheap checks first: those
    without a caption or a phrase carry corrupt image bytes (or none) and still count as
    no_caption / no_phrase, not bad_image; a decode spy sees only the phrased samples' images,
    the detector only their phrases. A phrased sample's corrupt image is bad_image."""
    from trainer.data.vesl import label

    corrupt = [b"\xff\xd8 corrupt %d" % i for i in range(3)]
    car, birds = _jpeg(80, 50, 0), _jpeg(30, 70, 1)
    samples = [
        {"__key__": "car", "jpg": car, "txt": "a red car next to a small dog"},
        {"__key__": "nophrase", "jpg": corrupt[0], "txt": "it is there"},
        {"__key__": "nocaption", "jpg": corrupt[1], "json": {"regions": []}},
        {"__key__": "noimage", "txt": "it is there"},
        {"__key__": "broken", "jpg": corrupt[2], "txt": "a broken image of a cat"},
        {"__key__": "birds", "png": birds, "json": {"caption": "two birds on a wire"}},
    ]
    (tmp_path / "in").mkdir()
    with ShardSink(tmp_path / "in", file_name="s.tar") as sink:
        for s in samples:
            sink.write(dict(s))
    decoded: list[bytes] = []
    real_decode = label.decode_image
    monkeypatch.setattr(label, "decode_image", lambda data: decoded.append(data) or real_decode(data))
    asked: list[list[str]] = []
    det, opts = RegionDetector(detectors["confident"]), DetectOptions(score=0.5, max_regions=3)

    def detect(images, phrases):
        asked.extend(phrases)
        return det.detect(images, phrases, opts)

    out = tmp_path / "out"
    (out / "_done").mkdir(parents=True)
    report = label.ShardLabeller(detect, label.LabelOptions(batch_size=8), out).label(
        str(tmp_path / "in/s.tar"))
    counts = {r: report[r] for r in label.REASONS}
    assert counts == {"labelled": 2, "no_box": 0, "no_phrase": 2, "no_caption": 1,
                      "bad_image": 1, "duplicate_key": 0}, counts
    owner = {s.get("jpg", s.get("png")): s["__key__"] for s in samples}
    assert [owner[d] for d in decoded] == ["car", "broken", "birds"]  # whose images were decoded
    assert asked == [noun_phrases(samples[0]["txt"]), noun_phrases("two birds on a wire")]
    got = {s["__key__"]: s for s in read_shard(str(out / "s.tar"))}
    assert list(got) == [s["__key__"] for s in samples]  # every sample written, in order
    assert got["nophrase"]["jpg"] == corrupt[0] and got["noimage"].keys() >= {"txt", "json"}
    for key in ("nophrase", "noimage"):  # replace mode: no regions, the caption recorded
        assert json.loads(got[key]["json"]) == {"caption": "it is there", "regions": []}
    assert json.loads(got["nocaption"]["json"]) == {"regions": []}  # copied unchanged
    assert "json" not in got["broken"]


def test_detector_failure_leaves_the_shard_undone(tmp_path):
    """Only read errors finish a shard early; a failing detector (here: out of memory) stops
    the task with no done marker, so the shard is labelled again on resume."""
    from trainer.data.vesl.label import LabelOptions, ShardLabeller, done_path

    shards = _write_inputs(tmp_path / "in")

    def out_of_memory(images, phrases):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    labeller = ShardLabeller(out_of_memory, LabelOptions(), tmp_path / "out")
    (tmp_path / "out/_done").mkdir(parents=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        labeller.label(str(shards[1]))
    assert not done_path(tmp_path / "out", str(shards[1])).exists()
    assert not (tmp_path / "out" / shards[1].name).exists()
