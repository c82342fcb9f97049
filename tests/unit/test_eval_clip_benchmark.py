"""clip_benchmark-layout eval sets, written here, evaluated by tools/evaluate.py in ONE call
(a classification set and a multi-caption retrieval set as two ``eval.sets``), give exactly
the numbers of clip_benchmark 1.6.2's own metric functions (zeroshot_classification.evaluate,
zeroshot_retrieval.evaluate) run on the same model, images (open_clip's eval transform) and
captions. Also: the training loader still skips caption-less samples; the files' class names
and ``{c}`` templates are the ones used."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_benchmark  # noqa: F401  (make setup installs it --no-deps: a missing one fails)
import sklearn  # noqa: F401  (what clip_benchmark's zeroshot_classification imports)
from eval_data import tiny_export, write_tar

ROOT = Path(__file__).resolve().parents[2]
S = 32
CLASSES = ["apple", "boat", "cat", "dog", "eagle", "fern"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}."]
WORDS = ["red", "small", "old", "wet", "bright", "dark", "striped", "tiny", "huge", "quiet"]


def image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    w, h = int(rng.integers(24, 90)), int(rng.integers(24, 90))
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.uniform(0, 1, 3)
    arr = (base + 0.3 * np.sin(rng.uniform(1, 9) * x + rng.uniform(1, 9) * y)[..., None]
           + rng.normal(0, 0.05, (h, w, 3)))
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """clip_benchmark's layout: ROOT/test/{nshards.txt, 0.tar, ...}, ROOT/classnames.txt,
    ROOT/zeroshot_classification_templates.txt."""
    base = tmp_path_factory.mktemp("cb")
    rng = np.random.default_rng(0)
    cls = base / "wds_toy_cls"
    (cls / "test").mkdir(parents=True)
    samples = [{"__key__": f"s{i:03d}", "png": image_bytes(rng, "PNG"),
                "cls": str(min(i // 4, 5)).encode()} for i in range(30)]  # unbalanced
    write_tar(cls / "test" / "0.tar", samples[:17])
    write_tar(cls / "test" / "1.tar", samples[17:])
    (cls / "test" / "nshards.txt").write_text("2\n")
    (cls / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (cls / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    ret = base / "wds_toy_ret"
    (ret / "test").mkdir(parents=True)
    captions = []
    for i in range(14):  # 1-3 captions per image; "a red boat" describes two images
        n = 1 + i % 3
        caps = [f"a {WORDS[(i + j) % 10]} {CLASSES[(i * 7 + j) % 6]} number {i}" for j in range(n)]
        if i in (3, 8):
            caps[0] = "a red boat"
        captions.append(caps)
    write_tar(ret / "test" / "0.tar", [{"__key__": f"r{i:03d}", "jpg": image_bytes(rng, "JPEG"),
                                        "txt": "\n".join(c).encode()}
                                       for i, c in enumerate(captions)])
    (ret / "test" / "nshards.txt").write_text("1\n")
    return {"cls": cls, "ret": ret, "captions": captions, "export": base / "export",
            "_": tiny_export(base / "export")}


def read_samples(split: Path) -> list[dict]:
    """Every sample of a clip_benchmark split, in shard order (as clip_benchmark reads it)."""
    out = []
    for i in range(int((split / "nshards.txt").read_text())):
        with tarfile.open(split / f"{i}.tar") as tar:
            by_key: dict = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(m).read()
            out.extend(by_key.values())
    return out


class Loader(list):
    """A list of batches with the ``.dataset.classes`` clip_benchmark's evaluate reads."""

    def __init__(self, batches, classes=None):
        super().__init__(batches)
        self.dataset = type("D", (), {"classes": classes})()


def clip_benchmark_numbers(sets, monkeypatch) -> tuple[dict, dict]:
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    from trainer import hub

    def accuracy(output, target, topk=(1,)):  # numpy 2: float() of a 1-element array fails
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum(0).item()) / len(target) for k in topk]

    monkeypatch.setattr(zc, "accuracy", accuracy)
    model, tok = hub.load(sets["export"]), hub.load_tokenizer(sets["export"])
    pre = open_clip.image_transform(S, is_train=False)

    def image(sample):
        data = next(sample[e] for e in ("png", "jpg") if e in sample)
        return pre(Image.open(io.BytesIO(data)))

    cls = read_samples(sets["cls"] / "test")
    batches = [(torch.stack([image(s) for s in cls[i:i + 8]]),
                torch.tensor([int(s["cls"]) for s in cls[i:i + 8]])) for i in range(0, len(cls), 8)]
    theirs_cls = zc.evaluate(model, Loader(batches, CLASSES), tok, CLASSES, TEMPLATES, "cpu",
                             amp=False)
    ret = read_samples(sets["ret"] / "test")
    batches = [(torch.stack([image(s) for s in ret[i:i + 4]]),
                [s["txt"].decode().split("\n") for s in ret[i:i + 4]]) for i in range(0, len(ret), 4)]
    theirs_ret = zr.evaluate(model, Loader(batches), tok, "cpu", amp=False,
                             recall_k_list=[1, 5, 10])
    return theirs_cls, theirs_ret


def test_two_clip_benchmark_sets_in_one_call_equal_clip_benchmark(sets, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as cli

    out = tmp_path / "eval.json"
    spec = (f"eval.sets={{toy_cls: {{urls: {sets['cls'] / 'test'}}}, "
            f"toy_ret: {{urls: {sets['ret'] / 'test'}, tasks: [retrieval]}}}}")
    assert cli.main(["--exported", str(sets["export"]), "--out", str(out), "data.workers=0",
                     "data.eval_batch_size=8", spec]) == 0
    report = json.loads(out.read_text())
    ours_cls = report["sets"]["toy_cls"]["metrics"]
    ours_ret = report["sets"]["toy_ret"]["metrics"]
    assert report["sets"]["toy_cls"]["templates"] == [t.replace("{c}", "{}") for t in TEMPLATES]
    assert ours_cls["zero_shot_images"] == 30 and ours_cls["zero_shot_classes"] == 6
    assert "image_to_text_r1" not in ours_cls  # caption-less: no retrieval
    n_caps = sum(len(c) for c in sets["captions"])
    assert ours_ret["retrieval_images"] == 14 and ours_ret["retrieval_texts"] == n_caps
    assert "zero_shot_top1" not in ours_ret

    theirs_cls, theirs_ret = clip_benchmark_numbers(sets, monkeypatch)
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours_cls[k] == theirs_cls[k], (k, ours_cls[k], theirs_cls[k])
    assert set(theirs_ret) <= set(ours_ret)
    for k, v in theirs_ret.items():
        assert ours_ret[k] == v, (k, ours_ret[k], v)
    # not trivially perfect or zero: the comparison says something
    print(theirs_cls, theirs_ret)
    assert 0 < theirs_cls["acc5"] < 1 and 0 < theirs_ret["image_retrieval_recall@1"] < 1
    assert theirs_cls["mean_per_class_recall"] != theirs_cls["acc1"]  # classes unbalanced


def test_training_loader_still_skips_caption_less_samples(sets):
    from trainer.data.config import DataConfig
    from trainer.data.pipeline import build_eval_loader, build_train_loader

    cfg = DataConfig(train_urls=str(sets["cls"] / "test"), eval_urls=str(sets["cls"] / "test"),
                     image_size=S, workers=0, batch_size=4, drop_last=False)
    train = build_train_loader(cfg, 0, 1)
    assert [b for b in train] == [] and train.counters["missing_caption"] == 30
    ev = build_eval_loader(cfg, 0, 1)
    labels = torch.cat([b["labels"] for b in ev])
    assert labels.tolist() == [int(s["cls"]) for s in read_samples(sets["cls"] / "test")]
