"""Bad data never kills a run: every kind is skipped or repaired, and counted per reason."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.config import DataConfig
from trainer.data.counters import DataCounters
from trainer.data.pipeline import build_train_loader


def _jpeg(w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _regions(*items) -> bytes:
    return json.dumps({"regions": list(items)}).encode()


GOOD = _jpeg()

# key -> (files, expected effect); image is 40x30
SAMPLES: dict[str, dict[str, bytes]] = {
    "good": {"jpg": GOOD, "txt": b"a red image"},
    "corrupt": {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"x"},
    "truncated": {"jpg": GOOD[: len(GOOD) // 2], "txt": b"x"},
    "empty_image": {"jpg": b"", "txt": b"x"},
    "no_image": {"txt": b"a caption without an image"},
    "no_caption": {"jpg": GOOD},
    "blank_caption": {"jpg": GOOD, "txt": b"   ", "json": b'{"caption": ""}'},
    "json_caption": {"jpg": GOOD, "json": b'{"caption": "caption from json"}'},
    "bad_json": {"jpg": GOOD, "txt": b"kept anyway", "json": b"{not json"},
    "list_json": {"jpg": GOOD, "txt": b"kept anyway", "json": b"[1, 2]"},
    "boxes": {"jpg": GOOD, "txt": b"boxes", "json": _regions(
        {"bbox": [5, 5, 20, 20], "caption": "fine"},
        {"bbox": [-10, 5, 20, 50], "caption": "clamped"},
        {"bbox": [50, 40, 90, 80], "caption": "outside"},
        {"bbox": [20, 20, 5, 5], "caption": "inverted"},
        {"bbox": [1, 2, 3], "caption": "three numbers"},
        {"bbox": [1, 2, 3, float("nan")], "caption": "nan"},
        {"bbox": [1, 2, 30, 20]},
        "not a dict",
    )},
    "many_regions": {"jpg": GOOD, "txt": b"many", "json": _regions(
        *({"bbox": [i, 0, i + 10, 30], "caption": f"r{i}", "score": i / 10} for i in range(5)))},
    "bad_utf8": {"jpg": GOOD, "txt": b"caf\xe9 latin-1"},
}


def _write_tar(path, samples: dict[str, dict[str, bytes]], duplicate_first: bool = False) -> None:
    with tarfile.open(path, "w") as tar:
        members = [(f"{k}.{ext}", data) for k, files in samples.items() for ext, data in files.items()]
        if duplicate_first:  # the first key gets its first file twice
            members.insert(len(next(iter(samples.values()))), members[0])
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_urls(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("bad")
    _write_tar(d / "a.tar", SAMPLES, duplicate_first=True)
    ok = {f"ok{i}": {"jpg": GOOD, "txt": b"fine"} for i in range(6)}
    _write_tar(d / "full.tar", ok)
    raw = (d / "full.tar").read_bytes()
    (d / "cut.tar").write_bytes(raw[: len(raw) // 2 + 100])  # truncated shard
    (d / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    return [str(d / "a.tar"), str(d / "cut.tar"), str(d / "missing.tar"), str(d / "garbage.tar")]


def _whole_samples_before(full, cut: int) -> list[str]:
    """Keys (in tar order) of ``full``'s samples whose every member (header and data) lies in
    its first ``cut`` bytes."""
    ends: dict[str, int] = {}
    with tarfile.open(full) as tar:
        for m in tar.getmembers():
            key = m.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    return [k for k, end in ends.items() if end <= cut]


def _cfg(urls: list[str], workers: int) -> DataConfig:
    cfg = DataConfig(train_urls="::".join(urls), batch_size=2, workers=workers, image_size=16,
                     max_regions=2, shuffle_buffer=4, drop_last=False)
    cfg.tokenizer.context_length = 8
    cfg.augment.scale_min = 1.0  # whole image: only the schema decides which boxes survive
    cfg.augment.ratio_min = cfg.augment.ratio_max = 40 / 30
    return cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_kind_is_counted_not_fatal(bad_urls, workers, caplog):
    loader = build_train_loader(_cfg(bad_urls, workers), 0, 1)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        keys = [k for b in loader for k in b["keys"]]
    c = loader.counters
    good = {"good", "json_caption", "bad_json", "list_json", "boxes", "many_regions", "bad_utf8"}
    assert set(keys) - {f"ok{i}" for i in range(6)} == good
    assert c["samples_ok"] == len(keys)
    # The truncated shard: 4 whole samples lie before the cut (ok4's header is cut). The tar
    # reader emits a sample when the next key's first member arrives, so the last whole one
    # (ok3) is still pending when ok4's truncated header raises and is lost with the tail:
    # exactly ok0..ok2, once each.
    cut = Path(bad_urls[1])
    whole = _whole_samples_before(cut.with_name("full.tar"), cut.stat().st_size)
    assert whole == ["ok0", "ok1", "ok2", "ok3"], whole
    assert sorted(k for k in keys if k.startswith("ok")) == whole[:-1]
    assert len(keys) == len(good) + len(whole) - 1  # every good sample exactly once
    assert c["corrupt_image"] == 3
    assert c["missing_image"] == 1
    assert c["missing_caption"] == 2
    assert c["malformed_json"] == 2
    assert c["box_clamped"] == 1 and c["box_outside"] == 1 and c["box_inverted"] == 1
    assert c["region_malformed"] == 4
    assert c["regions_truncated"] == 3 + 0  # 5 valid regions, R = 2
    assert c["duplicate_file"] == 1
    assert c["shard_read_error"] == 2   # truncated + garbage
    assert c["shard_open_error"] == 1   # missing file
    if workers == 0:  # worker processes log to their own stderr
        assert "corrupt_image" in caplog.text


def test_region_selection_prefers_scores_and_clamps(bad_urls):
    loader = build_train_loader(_cfg(bad_urls[:1], 0), 0, 1)
    by_key = {}
    for b in loader:
        for i, k in enumerate(b["keys"]):
            by_key[k] = (b["region_boxes"][i], b["region_mask"][i])
    boxes, mask = by_key["many_regions"]
    assert mask.tolist() == [True, True]
    # the two highest scores are i = 3, 4: x0 = 3/40, 4/40 in stored order
    assert [round(v, 4) for v in boxes[:, 0].tolist()] == [0.075, 0.1]
    boxes, mask = by_key["boxes"]
    assert mask.tolist() == [True, True]
    assert boxes[1].tolist() == pytest.approx([0.0, 5 / 30, 0.5, 1.0])  # clamped box


def test_counters_log_sparsely(caplog):
    c = DataCounters(log_first=2)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        for _ in range(120):
            c.record("corrupt_image", "shard:key")
    assert c["corrupt_image"] == 120
    assert caplog.text.count("corrupt_image") == 4  # 1, 2, then 10 and 100
    with pytest.raises(KeyError):
        c.record("not_a_reason")


def _batches(spec: str, workers: int, layout, **kw):
    from trainer.config import Config
    from trainer.data.batches import Batches

    cfg = Config()
    cfg.data = _cfg([spec], workers)
    for k, v in kw.items():
        setattr(cfg.data, k, v)
    return Batches(cfg, layout, None)


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_remote_shards_are_counted(bad_urls, tmp_path, workers, dist1):
    """pipe: shards that fail (a command that prints nothing and exits 1, a stream that is not
    a tar) are skipped and counted; the readable one trains."""
    full = Path(bad_urls[0]).with_name("full.tar")
    (tmp_path / "text.txt").write_text("not a tar" * 100)
    spec = f"pipe:cat {full}::pipe:cat /nonexistent/x-{{0..1}}.tar::pipe:cat {tmp_path}/text.txt"
    b = _batches(spec, workers, dist1)
    keys = [k for _ in range(3) for k in b.next(1)[0]["keys"]]  # 6 samples, batches of 2
    assert sorted(keys) == [f"ok{i}" for i in range(6)]
    assert b.shards_failed() == 3 and b.loader.counters["shard_read_error"] == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_without_a_readable_shard_is_one_line_naming_the_spec(tmp_path, workers, dist1):
    """Every shard fails: NoDataError (trainer.train: exit 2, `error: <this line>`), not an
    endless loop nor a traceback of the data workers."""
    from trainer.data.counters import NoDataError

    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    spec = f"pipe:cat /nonexistent/x-{{0..2}}.tar::{tmp_path}/garbage.tar"
    with pytest.raises(NoDataError) as e:
        _batches(spec, workers, dist1).next(1)
    assert str(e.value) == (
        f"data.train_urls={spec!r} on data rank 0: no shard could be read in epoch 1 (4 failed: "
        "shard_read_error=4; the first failures are logged above)")
    # resampled: the endless draw gives up after 1000 shards in a row without a sample; in a
    # worker process too (torch wraps the worker's traceback into the message: unwrapped)
    with pytest.raises(NoDataError) as e:
        _batches(f"{tmp_path}/garbage.tar", workers, dist1, resampled=True,
                 batches_per_epoch=4).next(1)
    assert str(e.value) == (
        f"data.train_urls='{tmp_path}/garbage.tar' on data rank 0: 1000 shards in a row yielded "
        f"no sample (last: {tmp_path}/garbage.tar; shard_read_error=1000)")
