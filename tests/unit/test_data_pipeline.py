"""Shard pipeline: URL forms, rank/worker partition, determinism, batch contract."""
from __future__ import annotations

import os

import pytest
import torch

from trainer.data.config import DataConfig, DataConfigError
from trainer.data.pipeline import build_eval_loader, build_train_loader, data_parallel_rank_world
from trainer.data.sources import synthetic_scenes
from trainer.data.urls import expand_urls
from trainer.data.writer import write_shards

N, SHARD = 48, 6  # 8 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    sink = write_shards(synthetic_scenes(N, seed=3, size=32, max_shapes=4), d, "scenes", SHARD)
    return sink


def _cfg(urls: str, **kw) -> DataConfig:
    cfg = DataConfig(train_urls=urls, batch_size=4, workers=2, image_size=24, max_regions=3,
                     shuffle_buffer=5, drop_last=False, seed=11)
    cfg.tokenizer.context_length = 16
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _epoch_keys(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


def test_one_epoch_2_ranks_x_2_workers_sees_every_sample_once(shards):
    all_keys = []
    for rank in range(2):
        loader = build_train_loader(_cfg(shards.pattern()), rank=rank, world=2)
        keys = _epoch_keys(loader)
        assert loader.epoch == 1
        all_keys += keys
    assert len(all_keys) == N
    assert sorted(all_keys) == sorted(f"scene0003_{i:08d}" for i in range(N))


def test_partition_with_uneven_shards_and_in_process(shards):
    urls = "::".join(shards.paths[:7])  # 7 shards over 3 ranks, in-process (one stream per rank)
    keys = []
    for rank in range(3):
        keys += _epoch_keys(build_train_loader(_cfg(urls, workers=0), rank=rank, world=3))
    assert len(keys) == len(set(keys)) == 7 * SHARD


def test_epoch_order_deterministic_and_reshuffled(shards):
    cfg = _cfg(shards.pattern(), workers=0)
    a, b = build_train_loader(cfg, 0, 1), build_train_loader(cfg, 0, 1)
    ea0, eb0 = _epoch_keys(a), _epoch_keys(b)
    ea1 = _epoch_keys(a)
    assert ea0 == eb0                     # same (seed, epoch): same order
    assert ea0 != ea1 and sorted(ea0) == sorted(ea1)  # next epoch: new order, same samples
    cfg.seed = 12
    assert _epoch_keys(build_train_loader(cfg, 0, 1)) != ea0


def test_batch_contract(shards):
    cfg = _cfg(shards.pattern(), workers=0, drop_last=True)
    loader = build_train_loader(cfg, 0, 1)
    tok_eot = 49407
    n = 0
    for batch in loader:
        n += 1
        B, R, L = 4, 3, 16
        assert batch["images"].shape == (B, 3, 24, 24) and batch["images"].dtype == torch.float32
        assert batch["text"].shape == (B, L) and batch["text"].dtype == torch.long
        assert batch["region_boxes"].shape == (B, R, 4)
        assert batch["region_text"].shape == (B, R, L)
        assert batch["region_mask"].shape == (B, R) and batch["region_mask"].dtype == torch.bool
        assert (batch["text"] == tok_eot).sum(-1).eq(1).all()
        assert (batch["region_text"] == tok_eot).sum(-1).eq(1).all()  # padded rows too
        boxes, mask = batch["region_boxes"], batch["region_mask"]
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[mask][:, 2] > boxes[mask][:, 0]).all() and (boxes[~mask] == 0).all()
        assert batch["labels"].eq(-1).all()
    assert n == N // 4
    assert loader.counters["samples_ok"] == N


def test_eval_loader_is_deterministic_and_keeps_partial_batch(shards):
    cfg = _cfg(shards.pattern(), workers=0, batch_size=5)
    batches = list(build_eval_loader(cfg, urls=shards.pattern()))
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [f"scene0003_{i:08d}" for i in range(N)]  # stored order, no shuffle
    assert len(batches[-1]["keys"]) == N % 5
    again = list(build_eval_loader(cfg, urls=shards.pattern()))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(batches, again))


def test_url_forms(shards, tmp_path):
    paths = shards.paths
    assert expand_urls(shards.pattern()) == paths
    assert expand_urls("::".join(paths[:2])) == paths[:2]
    listing = tmp_path / "shards.txt"
    rel = [p.replace(str(tmp_path.parent), "..") for p in paths[:2]]
    listing.write_text("# two shards\n" + "\n".join(rel) + "\n\n")
    assert [os.path.normpath(u) for u in expand_urls(str(listing))] == paths[:2]
    assert expand_urls(str(shards.out_dir)) == paths
    assert expand_urls([paths[0], f"pipe:cat {paths[1]}"]) == [paths[0], f"pipe:cat {paths[1]}"]
    with pytest.raises(ValueError, match="data.train_urls"):
        expand_urls("")
    with pytest.raises(FileNotFoundError, match="no-such"):
        expand_urls(str(tmp_path / "no-such.txt"))


def test_pipe_urls_read_like_files(shards):
    pipe = "::".join(f"pipe:cat {p}" for p in shards.paths)
    a = _epoch_keys(build_train_loader(_cfg(pipe, workers=0), 0, 1))
    b = _epoch_keys(build_train_loader(_cfg(shards.pattern(), workers=0), 0, 1))
    assert a == b and len(a) == N


def test_config_errors_name_keys():
    with pytest.raises(DataConfigError, match="data.batches_per_epoch"):
        DataConfig(train_urls="x", resampled=True).validate()
    with pytest.raises(DataConfigError, match="data.augment.scale_min"):
        cfg = DataConfig()
        cfg.augment.scale_min = 0
        cfg.validate()
    with pytest.raises(DataConfigError, match="data.tokenizer.model_path"):
        cfg = DataConfig()
        cfg.tokenizer.kind = "sentencepiece"
        cfg.validate()


def test_rank_world_helper_without_distributed():
    if not torch.distributed.is_initialized():
        assert data_parallel_rank_world() == (0, 1)
