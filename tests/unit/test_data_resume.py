"""Resume: a run stopped after batch N and resumed sees exactly the batches an uninterrupted
run would have seen next (same samples, same augmentation), across epoch boundaries."""
from __future__ import annotations

import json
import random

import pytest

import trainer.data.stream as stream_mod
from trainer.data.config import DataConfig
from trainer.data.pipeline import build_train_loader
from trainer.data.sources import synthetic_scenes
from trainer.data.stream import replay_buffer
from trainer.data.writer import write_shards
from data_resume import fingerprint

N, SHARD = 40, 5  # 8 shards


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("scenes")
    return write_shards(synthetic_scenes(N, seed=5, size=32), d, "scenes", SHARD).pattern()


def _cfg(pattern: str, **kw) -> DataConfig:
    cfg = DataConfig(train_urls=pattern, batch_size=3, workers=2, image_size=16, max_regions=2,
                     shuffle_buffer=7, drop_last=False, seed=4)
    cfg.tokenizer.context_length = 8
    cfg.augment.scale_min, cfg.augment.hflip_prob = 0.5, 0.5  # augmentation must replay too
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _run(cfg: DataConfig, total: int, rank: int, world: int, stop_at: int | None = None) -> list:
    loader = build_train_loader(cfg, rank, world)
    seen: list = []
    while len(seen) < total:
        for batch in loader:
            seen.append(fingerprint(batch))
            if len(seen) == stop_at:  # "crash": keep only the serialised state
                state = json.loads(json.dumps(loader.state_dict()))
                loader = build_train_loader(cfg, rank, world)
                loader.load_state_dict(state)
                stop_at = None
                break
            if len(seen) == total:
                break
    return seen


@pytest.mark.parametrize("mode", ["epoch_2_workers", "resampled_2_workers", "epoch_in_process"])
def test_resume_is_exact(pattern, mode):
    kw = {"epoch_2_workers": {}, "resampled_2_workers": {"resampled": True, "batches_per_epoch": 4},
          "epoch_in_process": {"workers": 0}}[mode]
    cfg = _cfg(pattern, **kw)
    rank, world = 1, 2  # 20 samples per rank: 7 batches per epoch in epoch mode
    total = 16 if mode != "resampled_2_workers" else 10
    reference = _run(cfg, total, rank, world)
    assert len(set(reference)) == len(reference)
    # within an epoch, at a worker's tail, at and across epoch boundaries (7 batches per epoch
    # in epoch mode, 4 when resampled)
    stops = {"epoch_2_workers": [1, 5, 6, 7, 9], "resampled_2_workers": [3, 4, 6],
             "epoch_in_process": [2, 6, 7, 8, 13]}[mode]
    for stop in stops:
        assert _run(cfg, total, rank, world, stop_at=stop) == reference, f"stop after batch {stop}"


def test_resume_opens_only_shards_with_buffered_samples(pattern, monkeypatch):
    cfg = _cfg(pattern, workers=0, shuffle_buffer=3, shuffle_shards=False)
    loader = build_train_loader(cfg, 0, 1)
    it = iter(loader)
    for _ in range(10):  # 30 of 40 samples consumed: 6+ of 8 shards finished
        next(it)
    state = loader.state_dict()
    it.close()
    opened: list[str] = []
    real = stream_mod.read_shard

    def counting(url):
        opened.append(url)
        return real(url)

    monkeypatch.setattr(stream_mod, "read_shard", counting)
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    rest = [k for b in resumed for k in b["keys"]]
    assert len(rest) == N - 30
    assert len(opened) <= 3, opened  # not all 8: finished shards without buffered samples skipped


def test_state_is_small_json_and_checked(pattern):
    cfg = _cfg(pattern, workers=0)
    loader = build_train_loader(cfg, 0, 2)
    next(iter(loader))
    state = loader.state_dict()
    assert len(json.dumps(state)) < 2000
    other = build_train_loader(cfg, 0, 4)
    with pytest.raises(ValueError, match="data-parallel world size: saved 2, now 4"):
        other.load_state_dict(state)


def test_replay_buffer_matches_real_buffer():
    """The integer replay reproduces the real buffer's layout and RNG state at any point."""
    for total in (0, 3, 10, 25):
        for size in (1, 4, 8):
            for stop in range(total + 1):
                rng_real = random.Random(9)
                buf, out = [], []
                for i in range(total):  # the real algorithm, run to `stop` hand-outs
                    if len(out) == stop:
                        break
                    if len(buf) < size:
                        buf.append(i)
                        continue
                    j = rng_real.randrange(size)
                    out.append(buf[j])
                    buf[j] = i
                while len(out) < stop:
                    j = rng_real.randrange(len(buf))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    out.append(buf.pop())
                rng = random.Random(9)
                ended = stop > max(0, total - size)
                layout, n_read = replay_buffer(size, rng, stop, total if ended else -1)
                assert layout == buf and rng.random() == rng_real.random(), (total, size, stop)


def test_counters_survive_resume(pattern):
    cfg = _cfg(pattern, workers=2)
    loader = build_train_loader(cfg, 0, 1)
    it = iter(loader)
    for _ in range(4):
        next(it)
    it.close()
    assert loader.counters["samples_ok"] == 12
    state = loader.state_dict()
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.counters["samples_ok"] == 12
    for _ in resumed:
        pass
    assert resumed.counters["samples_ok"] == N
