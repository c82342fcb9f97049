"""Label shards with detector regions, one output shard per input shard, resumable per shard.

Output layout under OUT:
    NAME.tar                    the input shard NAME.tar with each sample's JSON carrying
                                {"caption", "regions": [{"bbox", "caption", "score"}]}
    _done/NAME.json             written (atomically) after NAME.tar is complete: the counts
    label_regions.json          the run's settings; a later run into OUT must match them
    label_regions_report.json   the totals, written once every shard is done
A shard with a done marker is never labelled again; one without is (re)written from scratch
through NAME.tar.tmp. Samples stream through in batches: memory holds one batch of images.

Every input sample is written out. What happens to each is counted (`REASONS`), under the
first that applies in the order duplicate_key, no_caption, no_phrase, bad_image, then
labelled / no_box: the cheap checks come first, so an image is decoded (and the detector run)
only for a sample whose caption has phrases.
    labelled     the detector found at least one box: its regions are the detector's
    no_box       phrases, but no box above the score
    no_phrase    the caption has no candidate phrase (the image is not decoded)
    no_caption   no .txt and no JSON caption: copied unchanged (the image is not decoded)
    bad_image    phrases, but a missing or undecodable image: copied unchanged
    duplicate_key  a key seen earlier in the shard: dropped (shards forbid repeated keys)
In --mode replace the regions of labelled / no_box / no_phrase samples are the detector's
(possibly none); in append mode they follow the sample's own.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from trainer.data.schema import SkipSample, decode_image, image_bytes, sample_caption, sample_meta
from trainer.data.stream import read_shard
from trainer.data.vesl.detector import DetectOptions
from trainer.data.vesl.phrases import noun_phrases
from trainer.data.writer import ShardSink, output_shard_name
from trainer.io import commit_file, create_once, write_atomic

REASONS = ("labelled", "no_box", "no_phrase", "no_caption", "bad_image", "duplicate_key")
SETTINGS_FILE = "label_regions.json"
REPORT_FILE = "label_regions_report.json"
DONE_DIR = "_done"


class SettingsMismatch(ValueError):
    pass


@dataclass
class LabelOptions:
    detect: DetectOptions = field(default_factory=DetectOptions)
    max_phrases: int = 8      # candidate phrases per caption (0: all)
    batch_size: int = 16      # images per detector call
    mode: str = "replace"     # replace | append


def task_shards(urls: list[str], index: int, count: int) -> list[str]:
    """The contiguous block of `urls` that array task `index` of `count` labels."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"task index {index} of {count}: need 0 <= index < count")
    n = len(urls)
    return urls[index * n // count:(index + 1) * n // count]


def settings_of(urls: list[str], detector: str, opts: LabelOptions) -> dict:
    return {"shards": urls, "detector": os.path.abspath(detector), "mode": opts.mode,
            "max_phrases": opts.max_phrases, **asdict(opts.detect)}


def claim_output(out: Path, settings: dict) -> None:
    """Record the run's settings in OUT (the first task of an array does), or check that a
    run resumed into OUT uses the same ones."""
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)
    path = out / SETTINGS_FILE
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    if create_once(path, text):
        return
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        shown = ", ".join("the shard list differs" if k == "shards"
                          else f"{k}={old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
        raise SettingsMismatch(f"--out {out}: labelled earlier with other settings ({shown}); "
                               "resume with the same flags or choose a new --out")


def done_path(out: Path, url: str) -> Path:
    return out / DONE_DIR / (output_shard_name(url)[:-4] + ".json")


class ShardLabeller:
    """Labels shards with `detect(images, phrases) -> regions per image` (a RegionDetector's
    `detect` with its options bound)."""

    def __init__(self, detect: Callable[[list, list[list[str]]], list[list[dict]]],
                 opts: LabelOptions, out: str | Path):
        if opts.mode not in ("replace", "append"):
            raise ValueError(f"mode={opts.mode!r} (replace|append)")
        self.detect, self.opts, self.out = detect, opts, Path(out)

    def label(self, url: str, on_batch: Callable[[int], None] | None = None) -> dict:
        """Write OUT/NAME.tar for shard `url`, then its done marker; returns the counts.
        `on_batch(n)` is called after each batch of n samples (a progress bar).

        A shard that cannot be read to its end (truncated, corrupt, a failing pipe) is a fact
        about the input: what was read is labelled and the shard is done, its error recorded.
        Any other error (the detector's, the disk's) propagates and leaves no done marker."""
        name = output_shard_name(url)
        tmp = self.out / (name + ".tmp")
        counts: Counter = Counter()
        start, n, error = time.time(), 0, None
        batches = _batches(read_shard(url), self.opts.batch_size)
        with ShardSink(self.out, file_name=tmp.name) as sink:
            keys: set[str] = set()
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as e:  # reading the shard failed: keep what was read
                    error = f"{type(e).__name__}: {e}"[:300]
                    break
                for sample in self._label_batch(batch, counts, keys):
                    sink.write(sample)
                n += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
        commit_file(tmp, self.out / name)
        report = {"shard": url, "output": name, "samples": n, "regions": counts["regions"],
                  **{r: counts[r] for r in REASONS}, "read_error": error,
                  "seconds": round(time.time() - start, 2), "host": os.uname().nodename,
                  "pid": os.getpid()}
        write_atomic(done_path(self.out, url), json.dumps(report, indent=2) + "\n")
        return report

    def _label_batch(self, batch: list[dict], counts: Counter, keys: set[str]) -> list[dict]:
        """The output samples of a batch of raw samples, in order."""
        outs, images, phrases, slots = [], [], [], []
        for raw in batch:
            key = raw["__key__"]
            if key in keys:
                counts["duplicate_key"] += 1
                continue
            keys.add(key)
            sample = {k: v for k, v in raw.items() if not k.startswith("__")}
            sample["__key__"] = key
            outs.append(sample)
            # the cheap checks first: the image is decoded only for a sample with phrases
            meta = sample_meta(raw)
            caption = sample_caption(raw, meta)
            if not caption:
                counts["no_caption"] += 1
                continue
            found = noun_phrases(caption, self.opts.max_phrases)
            if found:
                image = _decoded(raw)
                if image is None:
                    counts["bad_image"] += 1
                    continue
            sample["json"] = meta
            meta.setdefault("caption", caption)
            if self.opts.mode == "replace" or not isinstance(meta.get("regions"), list):
                meta["regions"] = []
            if not found:
                counts["no_phrase"] += 1
                continue
            images.append(image)
            phrases.append(found)
            slots.append(meta)
        if images:
            for meta, regions in zip(slots, self.detect(images, phrases)):
                counts["labelled" if regions else "no_box"] += 1
                counts["regions"] += len(regions)
                meta["regions"] = meta["regions"] + regions
        return outs


def _decoded(raw: dict) -> Image.Image | None:
    """The sample's RGB image, or None when it has none or it does not decode."""
    data = image_bytes(raw)
    if data is None:
        return None
    try:
        return decode_image(data)
    except SkipSample:
        return None


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Lists of `size` samples; when reading fails, the samples read so far, then the error."""
    batch: list[dict] = []
    try:
        for s in samples:
            batch.append(s)
            if len(batch) >= size:
                yield batch
                batch = []
    except Exception:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def summarize(out: str | Path, urls: list[str]) -> dict:
    """Totals over the done markers of `urls` (shards not done yet are counted as pending)."""
    out = Path(out)
    total = {"shards": len(urls), "done": 0, "samples": 0, "regions": 0,
             **{r: 0 for r in REASONS}, "read_errors": []}
    for u in urls:
        p = done_path(out, u)
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        total["done"] += 1
        for k in ("samples", "regions", *REASONS):
            total[k] += r[k]
        if r.get("read_error"):
            total["read_errors"].append(f"{u}: {r['read_error']}")
    total["pending"] = total["shards"] - total["done"]
    return total


def write_total_report(out: str | Path, urls: list[str]) -> dict | None:
    """OUT/label_regions_report.json, the totals over every shard, once all are done (any
    array task may be the last to finish: each writes it, through its own temporary file).
    Returns the totals, or None while shards are pending."""
    total = summarize(out, urls)
    if total["pending"]:
        return None
    write_atomic(Path(out) / REPORT_FILE, json.dumps(total, indent=2) + "\n", concurrent=True)
    return total
