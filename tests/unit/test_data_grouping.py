"""Label-grouped batches (trainer/data/grouping.py) hold encoded samples, not decoded images:
the batches equal a decode-at-arrival reference, and memory stays bounded with many groups."""
from __future__ import annotations

import json
import zlib

import psutil
import pytest
from data_resume import fingerprint as _fp, stop_and_resume

from trainer.data.config import DataConfig
from trainer.data.pipeline import build_train_loader
from trainer.data.sources import synthetic_scene, synthetic_scenes
from trainer.data.writer import write_shards

B = 3


def _cfg(pattern: str, labels: str = "", **kw) -> DataConfig:
    cfg = DataConfig(train_urls=pattern, batch_size=B, workers=0, image_size=16, max_regions=2,
                     shuffle_buffer=6, seed=7, group_labels=labels, drop_last=False)
    cfg.tokenizer.context_length = 8
    cfg.augment.scale_min, cfg.augment.hflip_prob = 0.4, 0.5  # augmentation must match too
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    """40 scenes, every 7th with a corrupt image, 4 groups by key; 5 shards."""
    d = tmp_path_factory.mktemp("groups")
    samples = []
    for s in synthetic_scenes(40, seed=3, size=32):
        if int(s["__key__"][-3:]) % 7 == 3:
            s["jpg"] = b"\xff\xd8 not a jpeg"
        samples.append(s)
    pattern = write_shards(samples, d, "g", 8).pattern()
    table = {s["__key__"]: zlib.crc32(s["__key__"].encode()) % 4 for s in samples}
    (d / "labels.json").write_text(json.dumps({"labels": table}))
    return pattern, str(d / "labels.json"), table


def _reference(pattern: str, table: dict, drop_last: bool) -> list:
    """The batches of the old grouping: decode each sample as the stream hands it out (the
    plain loader at batch size 1 seeds the augmentation by hand-out exactly as grouping does),
    put it in its group's bucket, emit a bucket once it holds B decoded samples."""
    buckets: dict[int, list] = {}
    out = []
    for one in build_train_loader(_cfg(pattern, batch_size=1), 0, 1):
        bucket = buckets.setdefault(table[one["keys"][0]], [])
        bucket.append(one)
        if len(bucket) == B:
            out.append(_merge(buckets.pop(table[one["keys"][0]])))
    if not drop_last:
        out += [_merge(buckets[g]) for g in sorted(buckets)]
    return out


def _merge(ones: list[dict]) -> tuple:
    keys = tuple(k for b in ones for k in b["keys"])
    pixels = round(sum(float(b["images"].double().sum()) for b in ones), 6)
    boxes = tuple(v for b in ones for v in b["region_boxes"].flatten().tolist())
    return keys, pixels, boxes


@pytest.mark.parametrize("drop_last", [True, False])
def test_grouped_batches_equal_decode_at_arrival(corrupted, drop_last):
    pattern, labels, table = corrupted
    ref = _reference(pattern, table, drop_last)
    loader = build_train_loader(_cfg(pattern, labels, drop_last=drop_last), 0, 1)
    got = [_fp(b) for b in loader]
    assert got == ref
    assert len(got) >= 8
    bad = sum(1 for k in table if int(k[-3:]) % 7 == 3)
    if not drop_last:  # every bad sample decoded (counted) once, none twice
        assert loader.counters["corrupt_image"] == bad
        assert loader.counters["samples_ok"] == len(table) - bad


def test_grouped_resume_with_bad_samples_counts_once(corrupted):
    """A bucket that held a bad sample keeps its decoded-once survivors across a resume
    (Cursor.checked): batches stay exact and nothing is counted twice."""
    pattern, labels, table = corrupted
    cfg = _cfg(pattern, labels, workers=2)
    ref = [_fp(b) for b in build_train_loader(cfg, 0, 1)]
    held_checked = False
    for stop in (2, 4, 6, 9):
        got, state, resumed = stop_and_resume(lambda: build_train_loader(cfg, 0, 1), stop, _fp)
        held_checked |= any(c["checked"] for c in state["cursors"])
        assert got == ref, stop
        assert resumed.counters["corrupt_image"] == sum(1 for k in table if int(k[-3:]) % 7 == 3)
    assert held_checked  # some resume restored survivors of a bucket that held a bad sample


GROUPS, MEM_B, MEM_S = 700, 4, 160
# Before the last round every one of the 700 buckets holds MEM_B - 1 = 3 samples: 2100 waiting.
# Decoded uint8 images would take 2100 * 3 * 160 * 160 bytes = 161 MB; the encoded 32 x 32
# JPEG samples (~1.5 KB with caption and JSON) about 3 MB plus Python overhead.
RSS_BOUND = 48 * 2 ** 20


def test_many_groups_stay_under_a_memory_bound(tmp_path):
    keys = {}

    def rounds():  # round r: one sample of every group, so all buckets fill together
        for r in range(MEM_B):
            for g in range(GROUPS):
                s = synthetic_scene(r * GROUPS + g, seed=1, size=32)
                keys[s["__key__"]] = g
                yield s

    (tmp_path / "shards").mkdir()
    pattern = write_shards(rounds(), tmp_path / "shards", "m", 700).pattern()
    (tmp_path / "labels.json").write_text(json.dumps({"labels": keys}))
    cfg = _cfg(pattern, str(tmp_path / "labels.json"), batch_size=MEM_B, image_size=MEM_S,
               shuffle_buffer=1, shuffle_shards=False, normalize="device", drop_last=True)
    proc = psutil.Process()
    loader = build_train_loader(cfg, 0, 1)
    base = proc.memory_info().rss
    it = iter(loader)
    first = next(it)  # emitted in the last round: all 700 buckets were full up to B - 1 here
    peak = proc.memory_info().rss - base
    n = 1 + sum(1 for _ in it)
    assert n == GROUPS and len(first["keys"]) == MEM_B
    print(f"rss growth with {GROUPS * (MEM_B - 1)} samples waiting: {peak / 2 ** 20:.1f} MiB "
          f"(bound {RSS_BOUND / 2 ** 20:.0f} MiB; decoded images would take "
          f"{GROUPS * (MEM_B - 1) * 3 * MEM_S ** 2 / 2 ** 20:.0f} MiB)")
    assert peak < RSS_BOUND, f"rss grew {peak / 2 ** 20:.1f} MiB"
