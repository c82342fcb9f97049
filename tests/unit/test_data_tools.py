"""tools/make_shards.py (synthetic, Fashion-MNIST, folder) and tools/add_regions.py round trip;
the output shard name that add_regions.py and label_regions.py share (trainer/data/writer.py)."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.config import DataConfig
from trainer.data.pipeline import build_eval_loader
from trainer.data.counters import DataCounters
from trainer.data.schema import decode_sample
from trainer.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from trainer.data.stream import read_shard
from trainer.data.urls import expand_urls
from trainer.data.writer import check_output_names, output_shard_name

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_shards, add_regions = _tool("make_shards"), _tool("add_regions")


def _samples(pattern: str) -> list[dict]:
    return [s for url in expand_urls(pattern) for s in read_shard(url)]


def _cfg(**kw) -> DataConfig:
    cfg = DataConfig(batch_size=8, workers=0, image_size=32, max_regions=4)
    cfg.tokenizer.context_length = 16
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_synthetic_scenes_deterministic_and_boxes_match_pixels(tmp_path):
    args = ["synthetic", "--count", "12", "--seed", "7", "--size", "48", "--shard-size", "5",
            "--format", "png", "--quiet"]
    assert make_shards.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert make_shards.main(args + ["--out", str(tmp_path / "b")]) == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["dataset.json", "scenes-000000.tar", "scenes-000001.tar", "scenes-000002.tar"]
    for n in names:  # byte-identical: deterministic by seed
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert meta["count"] == 12
    assert meta["pattern"] == "scenes-{000000..000002}.tar"
    samples = _samples(str(tmp_path / "a" / meta["pattern"]))
    assert len(samples) == 12
    for s in samples:
        d = decode_sample(s, DataCounters())
        caps = d.region_captions
        assert caps and d.caption == (caps[0] if len(caps) == 1 else
                                      ", ".join(caps[:-1]) + " and " + caps[-1])
        assert (np.diff(d.boxes[:, 0]) >= 0).all()  # caption and regions go left to right
        img = np.asarray(d.image).astype(int)
        bg = img.max(-1) < 70  # background is dark; shapes are bright or saturated
        for x0, y0, x1, y1 in d.boxes.astype(int):
            inside = ~bg[y0:y1, x0:x1]
            assert inside.any(axis=0).all() and inside.any(axis=1).all()  # shape spans the box
        fg = ~bg
        for x0, y0, x1, y1 in d.boxes.astype(int):
            fg[y0:y1, x0:x1] = False
        assert not fg.any()  # no shape pixel outside every box


BAD_ARGS = [
    ("make_shards", ["synthetic", "--count", "-5"], "--count=-5"),
    ("make_shards", ["folder", "--images", "{tmp}", "--captions", "{tmp}/missing.csv"],
     "--captions {tmp}/missing.csv"),
    ("add_regions", ["--shards", "{tmp}/s-{{000000..000001}}.tar", "--regions",
                     "{tmp}/missing.jsonl"], "--regions {tmp}/missing.jsonl"),
    # the rest in-process (a subprocess costs seconds of imports each)
    ("make_shards", ["synthetic", "--count", "0"], "--count=0"),
    ("make_shards", ["synthetic", "--count", "3", "--shard-size", "0"], "--shard-size=0"),
    ("make_shards", ["synthetic", "--count", "3", "--size", "0"], "--size=0"),
    ("make_shards", ["synthetic", "--count", "3", "--min-shapes", "3", "--max-shapes", "2"],
     "--max-shapes=2"),
    ("make_shards", ["fashion-mnist", "--count", "-1"], "--count=-1"),
    ("make_shards", ["fashion-mnist", "--split", "test", "--offset", "10000"], "--offset=10000"),
    ("make_shards", ["folder", "--images", "{tmp}/nodir", "--captions", "{tmp}/c.csv"],
     "--images {tmp}/nodir"),
    ("make_shards", ["folder", "--images", "{tmp}", "--captions", "{tmp}/c.csv", "--regions",
                     "{tmp}/r.jsonl"], "--regions {tmp}/r.jsonl"),
    ("add_regions", ["--shards", "{tmp}/list.txt", "--regions", "{tmp}/c.csv"], "list.txt"),
]


@pytest.mark.parametrize("case", range(len(BAD_ARGS)))
def test_tools_reject_bad_arguments_in_one_line(tmp_path, capsys, case):
    tool, args, names = BAD_ARGS[case]
    (tmp_path / "c.csv").write_text("image,caption\n")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args] + ["--out", str(out), "--quiet"]
    names = names.format(tmp=tmp_path)
    if case < 3:
        r = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args],
                           capture_output=True, text=True, timeout=120)
        rc, err = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as e:
            {"make_shards": make_shards, "add_regions": add_regions}[tool].main(args)
        rc, err = e.value.code, capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err, err
    assert not out.exists()


def test_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.tar").write_bytes(b"x")
    assert make_shards.main(["synthetic", "--count", "2", "--out", str(out), "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "keep.tar").read_bytes() == b"x"


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT),
                    reason="Debian dataset-fashion-mnist not installed (apt-packages.txt)")
def test_fashion_mnist_eval_split_has_labels(tmp_path):
    out = tmp_path / "fm"
    assert make_shards.main(["fashion-mnist", "--split", "test", "--count", "20", "--size", "32",
                             "--shard-size", "8", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["count"] == 20 and meta["classnames"] == list(FASHION_MNIST_CLASSES)
    labels, keys = [], []
    pattern = str(out / meta["pattern"])
    for batch in build_eval_loader(_cfg(), urls=pattern):
        labels += batch["labels"].tolist()
        keys += batch["keys"]
        assert batch["images"].shape[1:] == (3, 32, 32)
    assert keys == [f"fmnist_test_{i:05d}" for i in range(20)]
    # the first test labels of Fashion-MNIST, read from the IDX file by hand
    with gzip.open(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")) as f:
        truth = list(f.read()[8:28])
    assert labels == truth
    s = _samples(pattern)[0]
    meta0 = json.loads(s["json"])
    assert s["txt"].decode() == f"a photo of a {FASHION_MNIST_CLASSES[truth[0]]}"
    assert meta0["label"] == truth[0] and s["cls"] == str(truth[0]).encode()
    img = Image.open(io.BytesIO(s["png"]))
    assert img.mode == "RGB" and img.size == (32, 32)


def test_folder_source_with_regions(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (10, 200, 10)).save(imgs / "a.jpg")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(imgs / "sub" / "b.v2.png")
    Image.new("RGB", (8, 8)).save(imgs / "c.bmp")
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["a.jpg", "green"], ["sub/b.v2.png", "dark"], ["c.bmp", "bmp"], ["gone.jpg", "x"]])
    (tmp_path / "regions.jsonl").write_text(
        json.dumps({"image": "a.jpg", "regions": [{"bbox": [0, 0, 10, 10], "caption": "left"}]}) + "\n")
    out = tmp_path / "out"
    assert make_shards.main(["folder", "--images", str(imgs), "--captions", str(tmp_path / "caps.csv"),
                             "--regions", str(tmp_path / "regions.jsonl"), "--out", str(out),
                             "--quiet"]) == 0
    samples = {s["__key__"]: s for s in _samples(str(out))}
    assert set(samples) == {"a", "sub/b_v2", "c"}
    assert "jpg" in samples["a"] and "png" in samples["sub/b_v2"] and "png" in samples["c"]
    assert json.loads(samples["a"]["json"])["regions"][0]["caption"] == "left"
    assert samples["a"]["jpg"] == (imgs / "a.jpg").read_bytes()  # stored as it was


def test_add_regions_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    assert make_shards.main(["synthetic", "--count", "10", "--seed", "1", "--size", "32",
                             "--shard-size", "4", "--out", str(src), "--quiet"]) == 0
    keys = [s["__key__"] for s in _samples(str(src))]
    labels = [
        {"key": keys[0], "regions": [{"bbox": [1, 2, 20, 30], "caption": "pseudo a", "score": 0.9}]},
        {"key": keys[3], "regions": [{"bbox": [0, 0, 8, 8], "caption": "pseudo b"},
                                     {"bbox": [0, 0], "caption": "invalid"}]},
        {"key": "no_such_key", "regions": [{"bbox": [0, 0, 1, 1], "caption": "lost"}]},
    ]
    (tmp_path / "pseudo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    out = tmp_path / "out"
    rc = add_regions.main(["--shards", str(src), "--regions", str(tmp_path / "pseudo.jsonl"),
                           "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["matched"] == 2 and report["unmatched_samples"] == 8
    assert report["unused_label_keys"] == 1 and report["unused_label_examples"] == ["no_such_key"]
    assert report["invalid_regions"] == 1
    tars = sorted(p for p in os.listdir(src) if p.endswith(".tar"))
    assert sorted(os.listdir(out)) == sorted(tars + ["add_regions.json"])
    before = {s["__key__"]: s for s in _samples(str(src))}
    after = {s["__key__"]: s for s in _samples(str(out))}
    assert list(after) == list(before)
    m0 = json.loads(after[keys[0]]["json"])
    assert m0["regions"] == labels[0]["regions"] and m0["caption"] == before[keys[0]]["txt"].decode()
    assert json.loads(after[keys[3]]["json"])["regions"] == labels[1]["regions"][:1]
    def strip(sample: dict) -> dict:
        return {x: v for x, v in sample.items() if x != "__url__"}

    for k in keys[1:3] + keys[4:]:
        assert strip(after[k]) == strip(before[k])  # copied unchanged
    # append mode keeps the synthetic regions and adds the pseudo ones
    out2 = tmp_path / "out2"
    assert add_regions.main(["--shards", str(src), "--regions", str(tmp_path / "pseudo.jsonl"),
                             "--out", str(out2), "--mode", "append", "--quiet"]) == 0
    old = json.loads(before[keys[0]]["json"])["regions"]
    assert json.loads({s["__key__"]: s for s in _samples(str(out2))}[keys[0]]["json"])["regions"] \
        == old + labels[0]["regions"]
    # refuses to overwrite
    assert add_regions.main(["--shards", str(src), "--regions", str(tmp_path / "pseudo.jsonl"),
                             "--out", str(out), "--quiet"]) == 2


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT),
                    reason="Debian dataset-fashion-mnist not installed (apt-packages.txt)")
def test_fashion_mnist_box_regions(tmp_path):
    """--regions box: one region per image, the garment's tight box (by hand with numpy)."""
    out = tmp_path / "fm"
    assert make_shards.main(["fashion-mnist", "--count", "4", "--size", "32", "--regions", "box",
                             "--out", str(out), "--quiet"]) == 0
    areas = []
    for s in _samples(str(out / json.loads((out / "dataset.json").read_text())["pattern"])):
        meta = json.loads(s["json"])
        a = np.asarray(Image.open(io.BytesIO(s["png"])).convert("L"))
        ys, xs = np.nonzero(a)
        (region,) = meta["regions"]
        assert region["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert region["caption"] == meta["caption"] == s["txt"].decode()
        x0, y0, x1, y1 = region["bbox"]
        areas.append((x1 - x0) * (y1 - y0))
    assert all(0 < a for a in areas) and min(areas) < 32 * 32  # real boxes, not the frame


def test_add_regions_streams_a_large_label_file(tmp_path, capsys):
    """Labels go through an on-disk index: the Python heap's peak (tracemalloc) while merging a
    10k-line JSONL stays under 1/10 of what holding the file as a dict takes (read_region_labels,
    the former way), and the merge is right (matches, duplicate lines merged in file order)."""
    import tracemalloc

    from trainer.data.sources import read_region_labels

    src = tmp_path / "src"
    assert make_shards.main(["synthetic", "--count", "6", "--size", "32", "--out", str(src),
                             "--quiet"]) == 0
    keys = [s["__key__"] for s in _samples(str(src))]
    region = {"bbox": [1.0, 2.0, 20.0, 30.0], "caption": "a pseudo label", "score": 0.5}
    lines = [{"key": f"other_{i:08d}", "regions": [region] * 3} for i in range(10_000)]
    lines[100] = {"key": keys[0], "regions": [dict(region, caption="first")]}
    lines[9_000] = {"key": keys[0], "regions": [dict(region, caption="second")]}
    lines[200] = {"image": keys[1] + ".jpg", "regions": [region]}
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tracemalloc.start()
    read_region_labels(str(jsonl))
    whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    assert add_regions.main(["--shards", str(src), "--regions", str(jsonl), "--out",
                             str(tmp_path / "out"), "--quiet"]) == 0
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert streamed * 10 < whole, (streamed, whole)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["matched"] == 2 and report["duplicate_label_lines"] == 1
    assert report["unused_label_keys"] == 10_000 - 3
    merged = {s["__key__"]: s for s in _samples(str(tmp_path / "out"))}
    assert [r["caption"] for r in json.loads(merged[keys[0]]["json"])["regions"]] == ["first", "second"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [p for p in os.listdir(src) if p.endswith(".tar")] + ["add_regions.json"])


@pytest.mark.parametrize("url,name", [
    ("/data/cc-000001.tar", "cc-000001.tar"),
    ("cc-000001.tar", "cc-000001.tar"),
    ("/data/cc-000001.tar.gz", "cc-000001.tar"),    # compressed in, plain tar out
    ("/data/cc-000001.tar.xz", "cc-000001.tar"),
    ("/data/cc-000001.tgz", "cc-000001.tar"),
    ("/data/cc.v2.tar", "cc.v2.tar"),
    ("/data/cc-000001", "cc-000001.tar"),
    ("https://host/cc/cc-000001.tar", "cc-000001.tar"),
    ("pipe:curl -s -L 'https://host/cc/cc-000001.tar'", "cc-000001.tar"),
    ("pipe:cat \"cc-000001.tar\"", "cc-000001.tar"),
])
def test_output_shard_name(url, name):
    assert output_shard_name(url) == name


def test_inputs_of_one_output_name_are_refused(tmp_path, capsys):
    """Two inputs mapping to one output would overwrite each other: refused in one line naming
    both, by the shared check and by add_regions.py before it creates --out (label_regions.py:
    tests/unit/test_label_regions.py)."""
    check_output_names(["/a/x.tar", "/a/y.tar", "/b/x.tgz.tar"])  # distinct names: fine
    with pytest.raises(ValueError) as e:
        check_output_names(["/a/x.tar", "/a/y.tar", "/b/x.tar.gz"], "--shards")
    assert str(e.value) == "--shards: '/a/x.tar' and '/b/x.tar.gz' would both be written as x.tar"
    src = tmp_path / "src"
    assert make_shards.main(["synthetic", "--count", "2", "--size", "16", "--out", str(src),
                             "--quiet"]) == 0
    (shard,) = [p for p in os.listdir(src) if p.endswith(".tar")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / shard).write_bytes((src / shard).read_bytes())
    (tmp_path / "list.txt").write_text(f"src/{shard}\nother/{shard}\n")
    (tmp_path / "pseudo.jsonl").write_text("")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        add_regions.main(["--shards", str(tmp_path / "list.txt"), "--regions",
                          str(tmp_path / "pseudo.jsonl"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"error: --shards: '{src / shard}' and '{tmp_path / 'other' / shard}' would "
                   f"both be written as {shard}\n")
    assert not out.exists()
