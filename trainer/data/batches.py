"""The microbatches of each training step: from the shard loader (epochs roll over) or
synthetic (``data.train_urls`` empty: tests, benchmarks), and moved to the device."""
from __future__ import annotations

import logging

import torch

from trainer.config import Config
from trainer.data.counters import SHARD_FAILURES, NoDataError
from trainer.data.normalize import normalize_on_device
from trainer.data.pipeline import build_train_loader
from trainer.data.position import data_position
from trainer.distributed import collectives as C
from trainer.distributed.layout import ParallelLayout

log = logging.getLogger("upclip")


def synthetic_microbatches(cfg: Config, layout: ParallelLayout, step: int) -> list[dict]:
    """Random images and captions, fixed per (step mod 4, microbatch, dp rank) so a tiny model
    can fit them; identical on every TP/PP rank of a data-parallel replica. Used when
    ``data.train_urls`` is empty (tests, benchmarks)."""
    m, t = cfg.model, cfg.train
    out = []
    for mb in range(t.num_microbatches):
        g = torch.Generator().manual_seed(
            hash((t.seed, step % 4, mb, layout.dp_rank)) % (2 ** 31))
        b = t.micro_batch_size
        images = torch.randn(b, 3, m.vision.image_size, m.vision.image_size, generator=g)
        text = torch.randint(1, m.text.eot_id, (b, m.text.context_length), generator=g)
        ends = torch.randint(1, m.text.context_length, (b,), generator=g)
        text[torch.arange(b), ends] = m.text.eot_id
        text = torch.where(torch.arange(m.text.context_length) > ends[:, None], 0, text)
        out.append({"images": images, "text": text, "size": b})
    return out


class Batches:
    """Microbatches for each step: from the shard loader (epochs roll over), or synthetic."""

    def __init__(self, cfg: Config, layout: ParallelLayout, tokenizer):
        self.cfg, self.layout = cfg, layout
        self.loader = self._it = None
        if cfg.data.train_urls:
            self.loader = build_train_loader(cfg.data, rank=layout.dp_rank, world=layout.dp,
                                             tokenizer=tokenizer)

    def next(self, step: int) -> list[dict]:
        if self.loader is None:
            return synthetic_microbatches(self.cfg, self.layout, step)
        return [self._one() for _ in range(self.cfg.train.num_microbatches)]

    def _one(self) -> dict:
        d = self.cfg.data
        where = f"data.train_urls={d.train_urls!r} on data rank {self.layout.dp_rank}"
        for _ in range(2):
            if self._it is None:
                before = self.loader.counters
                self._it = iter(self.loader)
            try:
                batch = next(self._it, None)
            except NoDataError as e:  # resampled: a long run of shards without a sample
                raise NoDataError(f"{where}: {e}") from None
            if batch is not None:
                return batch
            self._it = None  # the epoch ended: the next iter() starts the next one
        epoch = self.loader.counters.minus(before)
        failed = sum(epoch[r] for r in SHARD_FAILURES)
        if failed and not epoch["samples_ok"]:
            raise NoDataError(f"{where}: no shard could be read in epoch {self.loader.epoch - 1} "
                              f"({failed} failed: {epoch.summary()}; the first failures are "
                              f"logged above)")
        raise NoDataError(f"{where}: epoch {self.loader.epoch - 1} gave no batch "
                          f"({epoch.summary()}; data.batch_size={d.batch_size}, "
                          f"data.drop_last={d.drop_last})")

    def position(self) -> dict | None:
        """Collective over the data-parallel group: the job's data position (every DP rank's
        loader state merged, position.py), which any data-parallel size and data.workers can
        resume. The same on every rank."""
        if self.loader is None:
            return None
        return data_position(C.all_gather_object(self.loader.state_dict(),
                                                 group=self.layout.dp_group()))

    def resume(self, position: dict | None, rank_state: dict | None, epoch_hint: int) -> None:
        """Continue from a checkpoint's data position; ``rank_state``: this rank's own state in
        checkpoints made before positions were layout-independent (same layout only)."""
        if self.loader is None:
            return
        if position is not None:
            self.loader.load_position(position)
            return
        why = None
        if rank_state is None:
            why = "was saved at another data-parallel layout"
        elif rank_state.get("version") == 1 and rank_state.get("resampled"):
            why = "drew its resampled shards per worker, where an epoch is now one sequence"
        if why is None:
            self.loader.load_state_dict(rank_state)
            return
        log.warning("data: the checkpoint predates layout-independent data positions and %s: "
                    "the rest of its epoch %d cannot be located and is skipped; starting epoch "
                    "%d", why, epoch_hint, epoch_hint + 1)
        self.loader.set_epoch(epoch_hint + 1)

    def skipped(self) -> int:
        return 0 if self.loader is None else self.loader.counters.skipped()

    def shards_failed(self) -> int:
        """Shards of this rank that failed to open or read since the run started."""
        if self.loader is None:
            return 0
        counters = self.loader.counters  # merged over the workers on each read: once
        return sum(counters[r] for r in SHARD_FAILURES)


def to_device(batch: dict, device, cfg: Config) -> dict:
    """The batch on ``device``; uint8 images (``data.normalize=device``) CLIP-normalised there."""
    out = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v
           for k, v in batch.items()}
    if "images" in out:
        a = cfg.data.augment
        out["images"] = normalize_on_device(out["images"], a.mean, a.std)
    return out
