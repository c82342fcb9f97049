"""Label-grouped training batches: every batch holds samples of one group only.

DMU's multistage contrastive learning (trainer/dmu/) wants hard negatives: the samples that an
earlier stage could not tell apart (the same accumulated cluster label) share a batch. With
``data.group_labels=TABLE`` (JSON ``{"labels": {sample key: group}}``) each data worker keeps
one bucket per group on top of its usual shuffled stream and yields a bucket as a batch the
moment it holds ``data.batch_size`` samples. The batch order stays a pure function of (data,
seed, epoch, rank, world, workers, table).

- At the end of an epoch the partly filled buckets are dropped (``drop_last``, the default for
  training; CLIP-MoE's sampler drops them too) or yielded as short batches.
- Samples whose key is not in the table are skipped and logged (the table covers every sample
  that decoded when it was built).
- Memory: buckets hold the samples as the tar stored them (encoded image, caption, JSON), at
  most ``groups x (batch_size - 1)`` per worker; a bucket is decoded (with the augmentation
  seed of each sample's hand-out, so the batch is the same whenever it runs) only when it is
  full. At 729 groups, B = 64, S = 224 that is up to 729 * 63 encoded samples per worker
  (~0.5 GB of 10 KB JPEGs) where decoded uint8 images took 6.9 GB. A sample that
  fails to decode leaves its bucket (the bucket waits for another) and is counted then;
  samples not in the table are skipped undecoded.
- Resume stays exact: the worker's cursor also lists the hand-outs waiting in buckets
  (``Cursor.pending``). A resumed worker replays its stream from the start of the epoch
  (reading the tars again, keeping only the waiting samples, decoding nothing)
  and continues from there, so it yields exactly the batches an uninterrupted run would have.
  The price is re-reading the worker's shards of the epoch up to the resume point. At another
  data layout (position.py) the waiting samples count as not consumed: the new layout reads
  them again, into its own buckets.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.data.collate import Example
from trainer.data.counters import DataCounters
from trainer.data.position import slot_seed
from trainer.data.stream import Cursor, SampleStream, mix_seed

log = logging.getLogger("trainer.data")


def load_label_table(path: str | Path) -> dict[str, int]:
    """``{"labels": {key: group}}`` (or a plain ``{key: group}``) -> ``{key: group}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"data.group_labels={str(path)!r}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"data.group_labels={str(path)!r}: not valid JSON ({e.msg})") from None
    table = raw.get("labels", raw) if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
        raise ValueError(f"data.group_labels={str(path)!r}: expected {{\"labels\": {{sample key: "
                         "integer group}}}} with at least one entry")
    return table


def grouped_worker_items(ds, w: int) -> Iterator[dict]:
    """``ShardDataset.worker_items`` for label-grouped batches (same item protocol)."""
    start = ds.cursors[w]
    counters = DataCounters(start.counters)
    replayed = DataCounters()  # what a resume re-reads was counted before the checkpoint
    stream = SampleStream(lambda: ds.shards_of(w), ds.buffer_size,
                          slot_seed(ds.seed, ds.epoch, ds.rank, w), Cursor(),
                          counters if start.emitted == 0 else replayed)
    waiting, checked = set(start.pending), set(start.checked)
    buckets: dict[int, list[_Waiting]] = {}
    batches, emitted, unlabelled = start.batches, start.emitted, 0

    def decoded(bucket: list[_Waiting]) -> list[tuple[_Waiting, Example]]:
        """The bucket's samples that decode, decoded (augmentation seeded by the hand-out, as
        in ShardDataset, so the result does not depend on when it runs). A sample decoded
        before (``checked``) is not counted again."""
        out = []
        for s in bucket:
            rng = (random.Random(mix_seed("aug", ds.seed, ds.epoch, ds.rank, w, s.index))
                   if ds.train else None)
            ex = ds.processor(s.raw, DataCounters() if s.checked else counters, rng)
            s.checked = True
            if ex is not None:
                out.append((s, ex))
        return out

    def item(kind: str, done: bool, payload: dict | None = None) -> dict:
        held = [s for bucket in buckets.values() for s in bucket]
        cur = Cursor(emitted, stream.n_read if stream.ended else -1, list(stream.shard_sizes),
                     batches, done, counters.as_dict(), sorted(s.index for s in held),
                     sorted(s.index for s in held if s.checked))
        return {"kind": kind, "worker": w, "cursor": cur.to_dict(), "batch": payload}

    if not start.done:
        for e, raw in stream:
            if e < start.emitted:  # replaying up to the resume point
                if e == start.emitted - 1:
                    stream.counters = counters  # reads from here on are new
                if e in waiting:
                    group = ds.labels[raw["__key__"]]
                    buckets.setdefault(group, []).append(_Waiting(e, raw, e in checked))
                continue
            emitted = e + 1
            group = ds.labels.get(raw.get("__key__"))
            if group is None:
                unlabelled += 1
                if unlabelled <= 3 or unlabelled & (unlabelled - 1) == 0:
                    log.warning("data: sample %r is not in data.group_labels (%d so far); "
                                "skipped", raw.get("__key__"), unlabelled)
                continue
            bucket = buckets.setdefault(group, [])
            bucket.append(_Waiting(e, raw))
            if len(bucket) < ds.batch_size:
                continue
            good = decoded(bucket)  # a full bucket: decode it (drops what fails to decode)
            if len(good) < ds.batch_size:
                buckets[group] = [s for s, _ in good]
                continue
            del buckets[group]
            batches += 1
            yield item("batch", False, ds.processor.collate([ex for _, ex in good]))
        left = sum(len(b) for b in buckets.values())
        if left and not ds.drop_last:
            for group in sorted(buckets):
                good = decoded(buckets.pop(group))
                if good:
                    batches += 1
                    yield item("batch", False, ds.processor.collate([ex for _, ex in good]))
        elif left:
            log.info("data: rank %d worker %d epoch %d: %d samples in %d groups smaller than a "
                     "batch were left over", ds.rank, w, ds.epoch, left, len(buckets))
            buckets.clear()
    yield item("end", True)


@dataclass
class _Waiting:
    """A sample waiting in a group's bucket: its hand-out index and its encoded bytes."""

    index: int
    raw: dict
    checked: bool = False  # decoded once already (counted; survived a partly bad bucket)
