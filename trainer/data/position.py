"""The data position of an epoch, independent of the data-parallel size and ``data.workers``.

An epoch reads a global sequence of shard *instances*, the same for every layout: the shard list
permuted by (seed, epoch) (epoch mode), or an endless draw with replacement seeded by (seed,
epoch) (resampled). Instance k of the epoch's work list goes to slot k mod (world * workers),
slot = rank * workers + worker, and each slot shuffles its samples through its own buffer.

Where an epoch stands is therefore, per instance, which of its samples were consumed: all, none,
or every sample from some index on plus a few "holes" below it (samples that waited in a shuffle
buffer or a group bucket when the run stopped). `EpochCarry` holds that for the instances that a
previous layout touched. A run saves its per-slot cursors (small: counts, see stream.Cursor);
`carry_after` turns them into the per-instance form by replaying the shuffle buffers on integers,
and the work list of the new layout holds exactly the unconsumed samples, split over its slots.
So a resume at another layout sees every remaining sample of the epoch exactly once (epoch mode)
and continues the same instance sequence (resampled mode).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

from trainer.data.stream import Cursor, mix_seed, replay_buffer, sorted_contains


@dataclass(frozen=True)
class ShardItem:
    """One unit of a slot's work: the samples of shard instance `instance` still to read."""

    instance: int
    url: str
    holes: tuple[int, ...] = ()  # in-shard sample indices below `start` to read
    start: int | None = 0        # read every sample from this index on; None: only the holes

    def select(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The wanted samples of the shard's `samples` (all of them in order)."""
        if not self.holes and self.start == 0:
            yield from samples
            return
        last = None if self.start is not None else (self.holes[-1] if self.holes else -1)
        try:
            for j, raw in enumerate(samples):
                if last is not None and j > last:
                    return
                if (self.start is not None and j >= self.start) or sorted_contains(self.holes, j):
                    yield raw
        finally:
            close = getattr(samples, "close", None)
            if close is not None:
                close()

    def index_of(self, p: int) -> int:
        """The in-shard index of the p-th sample this item yields."""
        return self.holes[p] if p < len(self.holes) else self.start + p - len(self.holes)


@dataclass
class EpochCarry:
    """What earlier layouts left of the current epoch, per shard instance they touched:
    ``done`` instances are fully consumed; ``left[i] = (holes, start)`` as in ShardItem.
    Instances in neither are untouched."""

    done: set[int] = field(default_factory=set)
    left: dict[int, tuple[tuple[int, ...], int | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"done": sorted(self.done),
                "left": [[i, -1 if s is None else s, list(h)] for i, (h, s) in
                         sorted(self.left.items())]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "EpochCarry":
        if not d:
            return cls()
        return cls({int(i) for i in d["done"]},
                   {int(i): (tuple(int(v) for v in h), None if int(s) < 0 else int(s))
                    for i, s, h in d["left"]})

    def set(self, instance: int, holes: tuple[int, ...], start: int | None) -> None:
        self.left.pop(instance, None)
        self.done.discard(instance)
        if not holes and start is None:
            self.done.add(instance)
        elif holes or start != 0:
            self.left[instance] = (holes, start)


def epoch_instances(num_shards: int, *, seed: int, epoch: int, shuffle: bool,
                    resampled: bool) -> Iterator[int]:
    """The shard index of each instance of the epoch, in order (endless when resampled)."""
    if resampled:
        rng = random.Random(mix_seed("resample", seed, epoch))
        while True:
            yield rng.randrange(num_shards)
    order = list(range(num_shards))
    if shuffle:
        random.Random(mix_seed("shards", seed, epoch)).shuffle(order)
    yield from order


def epoch_items(urls: list[str], carry: EpochCarry, *, seed: int, epoch: int, shuffle: bool,
                resampled: bool) -> Iterator[ShardItem]:
    """The epoch's work list: every instance not fully consumed, with what is left of it."""
    for i, shard in enumerate(epoch_instances(len(urls), seed=seed, epoch=epoch, shuffle=shuffle,
                                              resampled=resampled)):
        if i in carry.done:
            continue
        holes, start = carry.left.get(i, ((), 0))
        yield ShardItem(i, urls[shard], holes, start)


def slot_items(items: Iterator[ShardItem], slot: int, slots: int) -> Iterator[ShardItem]:
    """The work items of global worker slot `slot` of `slots`, in order."""
    return islice(items, slot, None, slots)


def slot_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The seed of one slot's shuffle buffer and augmentation (stream.SampleStream)."""
    return mix_seed(seed, epoch, rank, worker)


def carry_after(urls: list[str], carry: EpochCarry, cursors: list[Cursor | None], *, workers: int,
                seed: int, epoch: int, shuffle: bool, resampled: bool,
                buffer_size: int) -> EpochCarry:
    """The carry after a run at `len(cursors) // workers` ranks x `workers` workers, started
    from `carry`, stopped where its per-slot `cursors` stand (None: the slot finished the
    epoch). A sample handed out by a slot's buffer is consumed, unless it waits in a group
    bucket (``Cursor.pending``); everything the slots had read and still buffered is not."""
    slots = len(cursors)
    out = EpochCarry(set(carry.done), dict(carry.left))
    size = max(1, buffer_size)
    work = epoch_items(urls, carry, seed=seed, epoch=epoch, shuffle=shuffle, resampled=resampled)
    if resampled:  # endless: as far as the furthest slot got
        if any(cur is None for cur in cursors):
            raise ValueError("a resampled epoch has no end: every slot needs a cursor")
        work = islice(work, slots * max(len(cur.shard_sizes) + 1 for cur in cursors))
    work = list(work)
    for s, cur in enumerate(cursors):
        items = work[s::slots]
        if cur is None:
            for item in items:
                out.set(item.instance, (), None)
            continue
        rng = random.Random(mix_seed("buffer", slot_seed(seed, epoch, s // workers, s % workers)))
        handouts = dict.fromkeys(cur.pending, -1)
        buffered, n_read = replay_buffer(size, rng, cur.emitted, cur.total, handouts)
        unconsumed = sorted(set(buffered) | set(handouts.values()))
        ended = cur.total >= 0
        pos = 0
        for m, item in enumerate(items):
            if m < len(cur.shard_sizes):
                read, finished = cur.shard_sizes[m], True
            elif m == len(cur.shard_sizes) and not ended and n_read > pos:
                read, finished = n_read - pos, False
            else:
                break
            lo, hi = bisect.bisect_left(unconsumed, pos), bisect.bisect_left(unconsumed, pos + read)
            waiting = {item.index_of(p - pos) for p in unconsumed[lo:hi]}
            if not finished:  # holes of the item not reached yet stay holes
                waiting.update(item.holes[read:])
            start = item.start
            if finished or start is None:
                start = None
            elif read > len(item.holes):
                start += read - len(item.holes)
            out.set(item.instance, tuple(sorted(waiting)), start)
            pos += read
    return out


LAYOUT_KEYS = ("world", "workers", "batch_size", "shuffle_buffer")  # may change across a resume
DATA_KEYS = {"seed": "data.seed", "resampled": "data.resampled", "shuffle_shards":
             "data.shuffle_shards", "num_shards": "number of shards in data.train_urls"}


def data_position(states: list[dict]) -> dict:
    """One position for the whole job from every data-parallel rank's `ShardLoader.state_dict()`
    (in rank order): what `ShardLoader.load_position` resumes at any layout. Each epoch's carry
    is stored once; the rest is the ranks' small cursors."""
    if not states:
        raise ValueError("data_position needs the state of every data-parallel rank")
    head = states[0]
    for r, st in enumerate(states):
        if st.get("rank") != r or st.get("world") != len(states):
            raise ValueError(f"data_position: state {r} is rank {st.get('rank')} of "
                             f"{st.get('world')}, expected rank {r} of {len(states)}")
    carry: dict[str, dict] = {}
    ranks = []
    for st in states:
        c = st.get("carry") or EpochCarry().to_dict()
        if carry.setdefault(str(st["epoch"]), c) != c:
            raise ValueError(f"data_position: ranks disagree on the carry of epoch {st['epoch']}")
        ranks.append({k: st[k] for k in ("epoch", "next_worker", "batches_in_epoch", "cursors",
                                         "past_counters")})
    return {"version": head["version"], **{k: head[k] for k in (*LAYOUT_KEYS, *DATA_KEYS)},
            "carry": carry, "ranks": ranks}
