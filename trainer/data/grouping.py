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
- Memory: at most ``groups x (batch_size - 1)`` processed samples wait per worker (uint8
  images with ``data.normalize=device``: 3 * S * S bytes each).
- Resume stays exact: the worker's cursor also lists the hand-outs waiting in buckets
  (``Cursor.pending``). A resumed worker replays its stream from the start of the epoch
  (reading the tars again, decoding only the waiting samples, with the same augmentation seeds)
  and continues from there, so it yields exactly the batches an uninterrupted run would have.
  The price is re-reading the worker's shards of the epoch up to the resume point.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Iterator

from trainer.data.counters import DataCounters
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
    stream = SampleStream(lambda: ds.shards_of(w), ds.shuffle_buffer if ds.train else 1,
                          mix_seed(ds.seed, ds.epoch, ds.rank, w), Cursor(),
                          counters if start.emitted == 0 else replayed)
    waiting = set(start.pending)
    buckets: dict[int, list] = {}  # group -> [(hand-out index, Example)]
    batches, emitted, unlabelled = start.batches, start.emitted, 0

    def rng(e: int) -> random.Random | None:  # as in ShardDataset: seeded by the position
        return random.Random(mix_seed("aug", ds.seed, ds.epoch, ds.rank, w, e)) if ds.train \
            else None

    def item(kind: str, done: bool, payload: dict | None = None) -> dict:
        pending = sorted(e for bucket in buckets.values() for e, _ in bucket)
        cur = Cursor(emitted, stream.n_read if stream.ended else -1, list(stream.shard_sizes),
                     batches, done, counters.as_dict(), pending)
        return {"kind": kind, "worker": w, "cursor": cur.to_dict(), "batch": payload}

    if not start.done:
        for e, raw in stream:
            if e < start.emitted:  # replaying up to the resume point
                if e == start.emitted - 1:
                    stream.counters = counters  # reads from here on are new
                if e in waiting:
                    ex = ds.processor(raw, replayed, rng(e))
                    if ex is None:
                        raise RuntimeError(f"resume: sample {raw.get('__key__')!r} waited in a "
                                           "group at the checkpoint but no longer decodes; the "
                                           "shards changed")
                    buckets.setdefault(ds.labels[ex.key], []).append((e, ex))
                continue
            emitted = e + 1
            ex = ds.processor(raw, counters, rng(e))
            if ex is None:
                continue
            group = ds.labels.get(ex.key)
            if group is None:
                unlabelled += 1
                if unlabelled <= 3 or unlabelled & (unlabelled - 1) == 0:
                    log.warning("data: sample %r is not in data.group_labels (%d so far); "
                                "skipped", ex.key, unlabelled)
                continue
            bucket = buckets.setdefault(group, [])
            bucket.append((e, ex))
            if len(bucket) == ds.batch_size:
                del buckets[group]
                batches += 1
                yield item("batch", False, ds.processor.collate([x for _, x in bucket]))
        left = sum(len(b) for b in buckets.values())
        if left and not ds.drop_last:
            for group in sorted(buckets):
                bucket = buckets.pop(group)
                batches += 1
                yield item("batch", False, ds.processor.collate([x for _, x in bucket]))
        elif left:
            log.info("data: rank %d worker %d epoch %d: %d samples in %d groups smaller than a "
                     "batch were left over", ds.rank, w, ds.epoch, left, len(buckets))
            buckets.clear()
    yield item("end", True)
