"""Per-worker sample streams with an exact, cheap resume.

Each (rank, worker) pair reads its own sequence of shards (a disjoint slice of a per-epoch
permutation, or an endless draw with replacement when resampled) and shuffles samples through a
buffer whose picks depend only on the RNG and the sample count, never on the data. So the
buffer's state at any point can be recomputed from a `Cursor` (samples handed out, stream
length once known, sizes of the shards read) by replaying the picks on integers; on resume the
worker re-reads only the shards that still hold buffered samples (usually the last one or two),
and decodes nothing that was already consumed.
"""
from __future__ import annotations

import bisect
import hashlib
import random
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from trainer.data.counters import DataCounters


def mix_seed(*parts: object) -> int:
    """A 64-bit seed from a tuple of parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def worker_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world: int, worker: int,
                  num_workers: int, shuffle: bool, resampled: bool) -> Iterator[str]:
    """The shard URLs that global worker slot (rank, worker) reads in this epoch, in order.

    Epoch mode: shard i of the epoch's permutation (seeded by (seed, epoch), the same on every
    rank) goes to slot i mod (world * num_workers): every shard is read exactly once per epoch.
    Resampled: an endless draw with replacement seeded by (seed, epoch, rank, worker).
    """
    if resampled:
        rng = random.Random(mix_seed("resample", seed, epoch, rank, worker))
        while True:
            yield urls[rng.randrange(len(urls))]
    order = list(range(len(urls)))
    if shuffle:
        random.Random(mix_seed("shards", seed, epoch)).shuffle(order)
    slot, slots = rank * num_workers + worker, world * num_workers
    for i in order[slot::slots]:
        yield urls[i]


class ShardOpenError(OSError):
    pass


class _CheckedTarInfo(tarfile.TarInfo):
    """Remembers why a tar stream ended: tarfile silently treats a truncated or garbled header
    after the first member as the end of the archive; we want to count those shards."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.upclip_end = None  # the proper end-of-archive (zero) block
            raise
        except tarfile.HeaderError as e:
            tar.upclip_end = f"{type(e).__name__}: {e or 'no end-of-archive block'}"
            raise


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one tar shard: {"__key__", "__url__", ext: bytes, ...}, grouped by key.

    Files are grouped by webdataset's rule (key = path up to the first dot of the basename);
    a repeated extension within a key is reported through a "__duplicate__" entry.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        raise ShardOpenError(f"{type(e).__name__}: {e}") from None
    finished = False
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo)
        current: dict | None = None
        for info in tar:
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            data = tar.extractfile(info).read()
            tar.members = []  # streaming: keep no member list
            if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext in current:
                current.setdefault("__duplicate__", []).append(ext)
                continue
            current[ext] = data
        if getattr(tar, "upclip_end", None):
            raise tarfile.ReadError(f"truncated or corrupt tar ({tar.upclip_end}) at byte {tar.offset}")
        if current is not None:
            yield current
        finished = True
    finally:
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except Exception:
            if finished:  # a failing command after a complete read is an error; after an early
                raise     # stop (resampled epoch end, an exception already raised) it is not


@dataclass
class Cursor:
    """Where one worker's stream stands, as seen by the trainer (after the last consumed batch)."""

    emitted: int = 0                      # samples the shuffle buffer handed out
    total: int = -1                       # the stream's length once it ended (-1: not yet)
    shard_sizes: list[int] = field(default_factory=list)  # samples read per finished shard
    batches: int = 0                      # batches this worker delivered and the trainer took
    done: bool = False                    # stream finished and its last batch consumed
    counters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"emitted": self.emitted, "total": self.total, "shard_sizes": list(self.shard_sizes),
                "batches": self.batches, "done": self.done, "counters": dict(self.counters)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["emitted"]), int(d["total"]), [int(v) for v in d["shard_sizes"]],
                   int(d["batches"]), bool(d["done"]), {k: int(v) for k, v in d["counters"].items()})


def replay_buffer(size: int, rng: random.Random, emitted: int, total: int) -> tuple[list[int], int]:
    """Replay the shuffle picks on integers: (buffer layout as raw indices, samples read).

    `rng` is advanced exactly as the real buffer advanced it after `emitted` hand-outs.
    """
    buf: list[int] = []
    n_read = out = 0
    while out < emitted:
        if total < 0 or n_read < total:
            if len(buf) < size:
                buf.append(n_read)
            else:
                buf[rng.randrange(size)] = n_read
                out += 1
            n_read += 1
        else:
            if not buf:
                raise RuntimeError(f"cursor says {emitted} samples were handed out but the "
                                   f"stream holds only {total}")
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            buf.pop()
            out += 1
    return buf, n_read


class SampleStream:
    """A worker's shuffled raw samples, resumable from a Cursor; yields (index, raw sample).

    The index counts hand-outs of the buffer; the buffer fills to `buffer_size`, then hands out
    a random slot for every new sample, then drains in random order at the end of the stream.
    """

    def __init__(self, shards: "callable", buffer_size: int, seed: int, cursor: Cursor,
                 counters: DataCounters, max_empty_shards: int = 1000):
        self.shards = shards              # () -> Iterator[str], the worker's shard sequence
        self.size = max(1, buffer_size)
        self.seed = seed
        self.start = cursor
        self.counters = counters
        self.max_empty_shards = max_empty_shards
        self.shard_sizes: list[int] = []  # finished shards, this pass
        self.n_read = 0
        self.ended = False

    def _source(self, n_read: int, needed: list[int]) -> Iterator[tuple[int, dict]]:
        """Raw samples with their stream index; below `n_read` only the `needed` ones, and
        finished shards that hold none of them are not even opened."""
        saved = self.start.shard_sizes
        idx, empty_run = 0, 0
        for k, url in enumerate(self.shards()):
            if k < len(saved) and idx + saved[k] <= n_read:
                lo = bisect.bisect_left(needed, idx)
                if lo == len(needed) or needed[lo] >= idx + saved[k]:
                    self.shard_sizes.append(saved[k])
                    idx += saved[k]
                    self.n_read = idx
                    continue
            count = 0
            try:
                for raw in read_shard(url):
                    i = idx + count
                    count += 1
                    self.n_read = idx + count
                    if i < n_read and not _contains(needed, i):
                        continue
                    for ext in raw.pop("__duplicate__", []):
                        if i >= n_read:
                            self.counters.record("duplicate_file", f"{url}:{raw['__key__']}", ext)
                    yield i, raw
            except ShardOpenError as e:
                if idx + count >= n_read:
                    self.counters.record("shard_open_error", url, str(e)[:200])
            except Exception as e:  # truncated / corrupt tar, failing pipe: lose the rest
                if idx + count >= n_read:
                    self.counters.record("shard_read_error", url, f"{type(e).__name__}: {e}"[:200])
            self.shard_sizes.append(count)
            idx += count
            self.n_read = idx
            empty_run = 0 if count else empty_run + 1
            if empty_run >= self.max_empty_shards:
                raise RuntimeError(f"{empty_run} shards in a row yielded no sample (last: {url}); "
                                   "check data.train_urls")

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        rng = random.Random(mix_seed("buffer", self.seed))
        emitted = self.start.emitted
        layout, n_read = replay_buffer(self.size, rng, emitted, self.start.total)
        position = {raw_idx: pos for pos, raw_idx in enumerate(layout)}
        needed = sorted(position)
        buf: list = [None] * len(layout)
        restored, checked = 0, False
        for i, raw in self._source(n_read, needed):
            if i < n_read:
                buf[position[i]] = raw
                restored += 1
                continue
            if not checked:
                if restored != len(layout):
                    raise _changed(restored, len(layout))
                checked = True
            if len(buf) < self.size:
                buf.append(raw)
                continue
            j = rng.randrange(self.size)
            out, buf[j] = buf[j], raw
            yield emitted, out
            emitted += 1
        if restored < len(layout):
            raise _changed(restored, len(layout))
        self.ended = True
        while buf:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield emitted, buf.pop()
            emitted += 1


def _contains(sorted_list: list[int], x: int) -> bool:
    i = bisect.bisect_left(sorted_list, x)
    return i < len(sorted_list) and sorted_list[i] == x


def _changed(restored: int, expected: int) -> RuntimeError:
    return RuntimeError(f"resume: restored {restored} of {expected} buffered samples; the shards "
                        "changed since the checkpoint (same URLs, same contents are required)")
