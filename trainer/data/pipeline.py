"""Shards -> batches on one data-parallel rank, resumable at any batch.

    loader = build_train_loader(cfg.data, rank=dp_rank, world=dp_size)
    for batch in loader:            # one epoch, continuing from the loader's state
        ...
        ckpt["data"] = loader.state_dict()     # per rank; small and JSON-serialisable
    loader.load_state_dict(ckpt["data"])       # the next iteration continues exactly there

    position = data_position([state of every DP rank])  # position.py: the job's position
    loader.load_position(position)  # any DP size / data.workers: the rest of the epoch

Each DataLoader worker w of rank r is one logical stream (see stream.py). Workers yield whole
batches tagged with their cursor; the loader takes batches from the workers in a fixed
round-robin order (skipping finished workers), whatever order they arrive in, so the batch
sequence of a rank is a pure function of (data, seed, epoch, rank, world, workers) and a resumed
run sees exactly the batches an uninterrupted one would have seen next.
"""
from __future__ import annotations

import collections
import logging
import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.collate import SampleProcessor
from trainer.data.config import DataConfig
from trainer.data.counters import DataCounters, NoDataError
from trainer.data.eval_transform import ReferenceEvalTransform
from trainer.data.position import (DATA_KEYS, EpochCarry, ShardItem, carry_after, epoch_items,
                                   slot_items, slot_seed)
from trainer.data.stream import Cursor, SampleStream, mix_seed
from trainer.data.tokenizer import Tokenizer, build_tokenizer
from trainer.data.transforms import ImageTransform
from trainer.data.urls import expand_urls

log = logging.getLogger("trainer.data")

STATE_VERSION = 2  # 2: + carry, shuffle_buffer (version 1 loads at the same layout)


class ShardDataset(IterableDataset):
    """The per-worker side: one worker's shards -> shuffled samples -> examples -> batches.

    Yields items {"kind": "batch" | "end", "worker": w, "cursor": dict, "batch": dict}.
    """

    def __init__(self, urls: list[str], processor: SampleProcessor, *, rank: int, world: int,
                 num_workers: int, batch_size: int, drop_last: bool, seed: int,
                 shuffle_shards: bool, shuffle_buffer: int, resampled: bool, train: bool,
                 labels: dict[str, int] | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} is outside world={world}")
        self.urls = urls
        self.processor = processor
        self.rank, self.world, self.num_workers = rank, world, max(1, num_workers)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.seed, self.shuffle_shards, self.shuffle_buffer = seed, shuffle_shards, shuffle_buffer
        self.resampled, self.train = resampled, train
        self.labels = labels  # sample key -> group: label-grouped batches (grouping.py)
        self.epoch = 0
        self.carry = EpochCarry()  # what an earlier data layout left of this epoch
        self.cursors = [Cursor() for _ in range(self.num_workers)]

    @property
    def buffer_size(self) -> int:
        return max(1, self.shuffle_buffer if self.train else 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, dataset expects "
                               f"{self.num_workers}")
        yield from self.worker_items(info.id if info is not None else 0)

    def shards_of(self, worker: int) -> Iterator[ShardItem]:
        """The shards global worker slot (rank, worker) reads this epoch (position.py): item k
        of the epoch's work list goes to slot k mod (world * workers)."""
        items = epoch_items(self.urls, self.carry, seed=self.seed, epoch=self.epoch,
                            shuffle=self.shuffle_shards, resampled=self.resampled)
        return slot_items(items, self.rank * self.num_workers + worker,
                          self.world * self.num_workers)

    def worker_items(self, w: int) -> Iterator[dict]:
        if self.labels is not None:
            from trainer.data.grouping import grouped_worker_items
            yield from grouped_worker_items(self, w)
            return
        start = self.cursors[w]
        counters = DataCounters(start.counters)
        stream = SampleStream(lambda: self.shards_of(w), self.buffer_size,
                              slot_seed(self.seed, self.epoch, self.rank, w), start, counters)
        batches, emitted, batch = start.batches, start.emitted, []

        def item(kind: str, done: bool, payload: dict | None = None) -> dict:
            cur = Cursor(emitted, stream.n_read if stream.ended else -1, list(stream.shard_sizes),
                         batches, done, counters.as_dict())
            return {"kind": kind, "worker": w, "cursor": cur.to_dict(), "batch": payload}

        if not start.done:
            for e, raw in stream:
                emitted = e + 1
                rng = None
                if self.train:  # augmentation seeded by the sample's position: replays on resume
                    rng = random.Random(mix_seed("aug", self.seed, self.epoch, self.rank, w, e))
                ex = self.processor(raw, counters, rng)
                if ex is None:
                    continue
                for one in ex if isinstance(ex, list) else (ex,):  # eval: N captions, N examples
                    batch.append(one)
                    if len(batch) == self.batch_size:
                        batches += 1
                        yield item("batch", False, self.processor.collate(batch))
                        batch = []
            if batch and not self.drop_last:
                batches += 1
                yield item("batch", False, self.processor.collate(batch))
        yield item("end", True)


class ShardLoader:
    """Rank-level loader: iterating it runs (the rest of) the current epoch.

    State (`state_dict`) = epoch, next worker in the round-robin, and one Cursor per worker.
    """

    def __init__(self, dataset: ShardDataset, *, workers: int, prefetch_factor: int = 2,
                 pin_memory: bool = False, batches_per_epoch: int = 0):
        self.dataset = dataset
        self.workers = workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.next_worker = 0
        self.batches_in_epoch = 0
        self.carry = EpochCarry()
        self.cursors = [Cursor() for _ in range(dataset.num_workers)]
        self.past_counters: dict[str, int] = {}

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        if self.batches_per_epoch <= 0:
            raise TypeError("the number of batches per epoch is unknown (data.batches_per_epoch=0)")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.epoch, ds.carry = self.epoch, self.carry
        ds.cursors = [Cursor.from_dict(c.to_dict()) for c in self.cursors]
        W = ds.num_workers
        if self.workers == 0:
            gen = ds.worker_items(0)
            pull, close = (lambda w: next(gen)), gen.close
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=W, prefetch_factor=self.prefetch_factor,
                                 pin_memory=self.pin_memory, persistent_workers=False))
            pending: dict[int, collections.deque] = {w: collections.deque() for w in range(W)}

            def pull(w: int) -> dict:
                while not pending[w]:
                    try:
                        got = next(it)
                    except StopIteration:
                        raise RuntimeError(f"data worker {w} stopped without its end marker") from None
                    except NoDataError as e:  # torch put the worker's traceback in the message
                        raise NoDataError(str(e).strip().rsplit("NoDataError: ", 1)[-1]) from None
                    pending[got["worker"]].append(got)
                return pending[w].popleft()

            def close() -> None:
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
        try:
            while self.batches_per_epoch <= 0 or self.batches_in_epoch < self.batches_per_epoch:
                w = self._next_active()
                if w is None:
                    break
                got = pull(w)
                self.cursors[w] = Cursor.from_dict(got["cursor"])
                self.next_worker = (w + 1) % W
                if got["kind"] == "end":
                    continue
                self.batches_in_epoch += 1
                yield got["batch"]
        finally:
            close()
        self._finish_epoch()

    def _next_active(self) -> int | None:
        W = len(self.cursors)
        for k in range(W):
            w = (self.next_worker + k) % W
            if not self.cursors[w].done:
                return w
        return None

    def _finish_epoch(self) -> None:
        log.info("data: rank %d finished epoch %d after %d batches (%s)", self.dataset.rank,
                 self.epoch, self.batches_in_epoch, self.counters.summary())
        self.past_counters = self.counters.as_dict()
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self.epoch = epoch
        self.next_worker = 0
        self.batches_in_epoch = 0
        self.carry = EpochCarry()
        self.cursors = [Cursor() for _ in range(self.dataset.num_workers)]

    # ------------------------------------------------------------------ reporting
    @property
    def counters(self) -> DataCounters:
        """Bad-data counters of this rank since the run started (resumes included)."""
        return DataCounters(self.past_counters).merged(*(c.counters for c in self.cursors))

    # ------------------------------------------------------------------ resume
    def _layout(self) -> dict:
        ds = self.dataset
        return {"rank": ds.rank, "world": ds.world, "workers": ds.num_workers, "seed": ds.seed,
                "resampled": ds.resampled, "num_shards": len(ds.urls), "batch_size": ds.batch_size}

    def state_dict(self) -> dict:
        """This rank's position (exact resume at the same layout; `data_position` merges every
        rank's into one that any layout can resume)."""
        return {"version": STATE_VERSION, **self._layout(), "epoch": self.epoch,
                "shuffle_buffer": self.dataset.buffer_size,
                "shuffle_shards": self.dataset.shuffle_shards,
                "next_worker": self.next_worker, "batches_in_epoch": self.batches_in_epoch,
                "carry": self.carry.to_dict(), "cursors": [c.to_dict() for c in self.cursors],
                "past_counters": dict(self.past_counters)}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's own `state_dict` (the same layout only)."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        names = {"rank": "rank", "world": "data-parallel world size", "workers": "data.workers",
                 "seed": "data.seed", "resampled": "data.resampled",
                 "num_shards": "number of shards in data.train_urls", "batch_size": "data.batch_size"}
        now = self._layout()
        wrong = [f"{names[k]}: saved {state.get(k)!r}, now {v!r}"
                 for k, v in now.items() if state.get(k) != v]
        if wrong:
            raise ValueError("cannot resume the data position exactly; these differ from the "
                             "checkpoint: " + "; ".join(wrong))
        self.epoch = int(state["epoch"])
        self.next_worker = int(state["next_worker"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.carry = EpochCarry.from_dict(state.get("carry"))
        self.cursors = [Cursor.from_dict(c) for c in state["cursors"]]
        self.past_counters = {k: int(v) for k, v in state["past_counters"].items()}


    def load_position(self, position: dict) -> None:
        """Resume from `data_position(...)` of a run at any data-parallel size and
        data.workers: at the same layout this rank's own state (exact: the same batches as an
        uninterrupted run); at another one the rest of the saved epoch, every sample not
        consumed before exactly once, split over this layout's slots (position.py)."""
        ds, ranks = self.dataset, position["ranks"]
        mine = {"seed": ds.seed, "resampled": ds.resampled, "shuffle_shards": ds.shuffle_shards,
                "num_shards": len(ds.urls)}
        wrong = [f"{DATA_KEYS[k]}: saved {position.get(k)!r}, now {v!r}"
                 for k, v in mine.items() if position.get(k) != v]
        if wrong:
            raise ValueError("cannot resume the data position; these differ from the "
                             "checkpoint: " + "; ".join(wrong))
        now = {"world": ds.world, "workers": ds.num_workers, "batch_size": ds.batch_size,
               "shuffle_buffer": ds.buffer_size}
        if all(position[k] == v for k, v in now.items()):
            own = ranks[ds.rank]
            self.load_state_dict({"version": position["version"], **self._layout(), **own,
                                  "carry": position["carry"][str(own["epoch"])]})
            return
        epoch = min(int(r["epoch"]) for r in ranks)
        workers = int(position["workers"])
        cursors = [Cursor.from_dict(c) if int(r["epoch"]) == epoch else None
                   for r in ranks for c in r["cursors"]]
        carry = carry_after(ds.urls, EpochCarry.from_dict(position["carry"][str(epoch)]), cursors,
                            workers=workers, seed=ds.seed, epoch=epoch, shuffle=ds.shuffle_shards,
                            resampled=ds.resampled, buffer_size=int(position["shuffle_buffer"]))
        ahead = [r for r, st in enumerate(ranks) if int(st["epoch"]) > epoch]
        if ahead and ds.rank == 0:
            log.warning("data: ranks %s of the checkpoint had finished epoch %d and started the "
                        "next; what they read of it will be read again (set "
                        "data.batches_per_epoch to keep ranks in step)", ahead, epoch)
        self.set_epoch(epoch)
        self.carry = carry
        self.batches_in_epoch = min(int(st["batches_in_epoch"]) for st in ranks
                                    if int(st["epoch"]) == epoch)
        own = [st for r, st in enumerate(ranks) if r % ds.world == ds.rank]
        self.past_counters = DataCounters().merged(
            *(DataCounters(st["past_counters"]).merged(
                *(c["counters"] for c in st["cursors"])) for st in own)).as_dict()
        if ds.rank == 0:
            log.info("data: resuming epoch %d at %d ranks x %d workers (saved at %d x %d): %d "
                     "shards done, %d partly read (%d samples below their read point to "
                     "re-read)", epoch, ds.world, ds.num_workers, len(ranks), workers,
                     len(carry.done), len(carry.left), sum(len(h) for h, _ in carry.left.values()))


# ---------------------------------------------------------------------- builders

def sample_processor(cfg: DataConfig, train: bool, tokenizer: Tokenizer | None) -> SampleProcessor:
    """Decode, transform and tokenize one sample as training (``train``) or evaluation does.
    Evaluation: ``data.augment.eval_resize`` picks the reference transform (default) or the
    fast one; caption-less class-labelled samples are kept and a multi-line caption is one
    caption per line (an eval set's formats, trainer/data/README.md)."""
    a = cfg.augment
    kind = ReferenceEvalTransform if not train and a.eval_resize == "reference" else ImageTransform
    transform = kind(
        size=cfg.image_size, train=train, scale=(a.scale_min, a.scale_max),
        ratio=(a.ratio_min, a.ratio_max), hflip_prob=a.hflip_prob, interpolation=a.interpolation,
        mean=tuple(a.mean), std=tuple(a.std), min_visibility=a.min_box_visibility,
        min_size=a.min_box_size, jpeg_draft=a.jpeg_draft)
    return SampleProcessor(transform, tokenizer or build_tokenizer(cfg.tokenizer), cfg.max_regions,
                           cfg.normalize, eval_set=not train)


def build_train_loader(cfg: DataConfig, rank: int, world: int,
                       tokenizer: Tokenizer | None = None) -> ShardLoader:
    """The training loader of data-parallel rank `rank` of `world` (pass DP rank/size, not the
    global rank: tensor/pipeline-parallel peers must see the same batches)."""
    cfg.validate("data")
    urls = expand_urls(cfg.train_urls, "data.train_urls")
    slots = world * max(1, cfg.workers)
    if not cfg.resampled and len(urls) < slots:
        log.warning("data: %d shards for %d (rank x worker) slots: some workers get no shard; "
                    "use more shards or data.resampled=true", len(urls), slots)
    labels = None
    if cfg.group_labels:
        from trainer.data.grouping import load_label_table
        labels = load_label_table(cfg.group_labels)
    ds = ShardDataset(urls, sample_processor(cfg, True, tokenizer), rank=rank, world=world,
                      num_workers=cfg.workers, batch_size=cfg.batch_size, drop_last=cfg.drop_last,
                      seed=cfg.seed, shuffle_shards=cfg.shuffle_shards,
                      shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled, train=True,
                      labels=labels)
    return ShardLoader(ds, workers=cfg.workers, prefetch_factor=cfg.prefetch_factor,
                       pin_memory=cfg.pin_memory, batches_per_epoch=cfg.batches_per_epoch)


def build_eval_loader(cfg: DataConfig, rank: int = 0, world: int = 1, urls: str | None = None,
                      tokenizer: Tokenizer | None = None) -> ShardLoader:
    """Deterministic evaluation loader over `urls` (default data.eval_urls): no shuffle, no
    augmentation (resize + center crop), keeps the last partial batch."""
    spec = urls if urls is not None else cfg.eval_urls
    shard_urls = expand_urls(spec, "data.eval_urls")
    ds = ShardDataset(shard_urls, sample_processor(cfg, False, tokenizer), rank=rank, world=world,
                      num_workers=cfg.workers, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      drop_last=False, seed=cfg.seed, shuffle_shards=False, shuffle_buffer=1,
                      resampled=False, train=False)
    return ShardLoader(ds, workers=cfg.workers, prefetch_factor=cfg.prefetch_factor,
                       pin_memory=cfg.pin_memory)


def data_parallel_rank_world(group=None) -> tuple[int, int]:
    """(rank, world) in `group` (pass the data-parallel group) or (0, 1) without distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return 0, 1
