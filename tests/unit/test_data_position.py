"""The data position survives a change of data-parallel size or data.workers (position.py).

Ranks are simulated in one process: every rank's loader takes one batch per step, as the
trainer's do; at the stop the ranks' states are merged (`data_position`), serialised, and
loaded by the loaders of the new layout, which run the rest of the epoch. In epoch mode the
sample keys seen before plus after equal one uninterrupted epoch's, with no repeats."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from trainer.data.config import DataConfig
from trainer.data.pipeline import build_train_loader
from trainer.data.position import data_position, epoch_instances
from trainer.data.sources import synthetic_scenes
from trainer.data.stream import read_shard
from trainer.data.urls import expand_urls
from trainer.data.writer import write_shards

N, SHARD = 48, 6  # 8 shards


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("scenes")
    return write_shards(synthetic_scenes(N, seed=8, size=24), d, "p", SHARD).pattern()


def _cfg(pattern: str, workers: int, **kw) -> DataConfig:
    cfg = DataConfig(train_urls=pattern, batch_size=2, workers=workers, image_size=8,
                     max_regions=1, shuffle_buffer=5, drop_last=False, seed=11)
    cfg.tokenizer.context_length = 8
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _loaders(cfg: DataConfig, world: int, position: dict | None = None) -> list:
    loaders = [build_train_loader(cfg, r, world) for r in range(world)]
    if position is not None:
        position = json.loads(json.dumps(position))  # what a checkpoint keeps
        for loader in loaders:
            loader.load_position(position)
    return loaders


def _steps(loaders: list, steps: int) -> tuple[list[str], dict]:
    """`steps` batches from every rank in lockstep; (keys seen, the merged position)."""
    its = [iter(loader) for loader in loaders]
    keys = []
    for _ in range(steps):
        for it in its:
            keys += next(it)["keys"]
    for it in its:
        it.close()
    return keys, data_position([loader.state_dict() for loader in loaders])


def _rest(loaders: list) -> list[str]:
    return [k for loader in loaders for batch in loader for k in batch["keys"]]


def _all_keys() -> list[str]:
    return sorted(f"scene0008_{i:08d}" for i in range(N))


@pytest.mark.parametrize("before, after, steps", [
    ((2, 1), (1, 1), 3),   # DP 2 -> 1 (what a requeue onto fewer nodes does)
    ((2, 1), (1, 1), 7),
    ((1, 1), (2, 1), 5),   # DP 1 -> 2
    ((1, 1), (1, 2), 4),   # data.workers 1 -> 2
    ((2, 2), (3, 1), 2),   # both
])
def test_epoch_resumes_at_another_layout_exactly_once(pattern, before, after, steps):
    (w0, k0), (w1, k1) = before, after
    reference = _rest(_loaders(_cfg(pattern, k0), w0))
    assert sorted(reference) == _all_keys()  # one uninterrupted epoch: every sample once
    seen, position = _steps(_loaders(_cfg(pattern, k0), w0), steps)
    assert 0 < len(seen) < N and position["ranks"][0]["epoch"] == 0
    rest = _rest(_loaders(_cfg(pattern, k1, batch_size=3), w1, position))
    _check_once(seen + rest, reference)


def _check_once(keys: list[str], reference: list[str]) -> None:
    got, want = Counter(keys), Counter(reference)
    assert got == want, f"repeated: {sorted(got - want)}; missing: {sorted(want - got)}"


@pytest.mark.parametrize("buffers, steps", [((5, 5), (3, 2)), ((12, 1), (2, 1))])
def test_layout_changes_twice_in_one_epoch(pattern, buffers, steps):
    """DP 2 -> 3 -> 1, workers 1 -> 1 -> 2: the second resume starts from what the first left,
    also where it stopped before re-reading every hole a shard had (a buffer of 12 leaves up to
    12 holes; the second layout, unshuffled, reads 3 samples per slot before its stop)."""
    seen, position = _steps(_loaders(_cfg(pattern, 1, shuffle_buffer=buffers[0]), 2), steps[0])
    more, position = _steps(_loaders(_cfg(pattern, 1, shuffle_buffer=buffers[1]), 3, position),
                            steps[1])
    assert position["carry"]["0"]["left"]  # a partly read shard carried through two layouts
    rest = _rest(_loaders(_cfg(pattern, 2), 1, position))
    _check_once(seen + more + rest, _all_keys())


def test_same_layout_position_is_exact(pattern):
    """At an unchanged layout the position resumes the very batches an uninterrupted run sees
    (same order), through a layout change made earlier in the epoch too."""
    _, position = _steps(_loaders(_cfg(pattern, 1), 2), 2)
    ref, _ = _steps(_loaders(_cfg(pattern, 1), 1, position), 9)
    got, mid = _steps(_loaders(_cfg(pattern, 1), 1, position), 4)
    got2, _ = _steps(_loaders(_cfg(pattern, 1), 1, mid), 5)
    assert got + got2 == ref


def test_grouped_batches_resume_at_another_layout(pattern, tmp_path):
    """Samples waiting in a group bucket at the stop are not consumed: the new layout reads
    them again, and nothing else twice."""
    table = {k: i % 3 for i, k in enumerate(_all_keys())}
    (tmp_path / "labels.json").write_text(json.dumps({"labels": table}))
    cfg = _cfg(pattern, 1, group_labels=str(tmp_path / "labels.json"))
    seen, position = _steps(_loaders(cfg, 2), 2)
    assert any(c["pending"] for r in position["ranks"] for c in r["cursors"])
    rest = _rest(_loaders(cfg, 1, position))
    _check_once(seen + rest, _all_keys())


def test_resampled_continues_the_instance_sequence(pattern):
    """Resampled: the epoch's shard instances are one sequence for every layout. A DP 2 -> 1
    resume consumes no sample instance twice and skips none: after the resume has read far
    enough, every sample of the instances touched before the stop was consumed exactly once."""
    cfg = _cfg(pattern, 1, resampled=True, batches_per_epoch=40)
    urls = expand_urls(pattern)
    keys_of = [[s["__key__"] for s in read_shard(u)] for u in urls]
    seen, position = _steps(_loaders(cfg, 2), 4)
    (loader,) = _loaders(cfg, 1, position)
    assert loader.epoch == 0 and loader.batches_in_epoch == 4
    rest = [k for b in loader for k in b["keys"]]  # 36 more batches of 2 at DP=1
    instances = list(zip(range(64), epoch_instances(len(urls), seed=11, epoch=0, shuffle=True,
                                                    resampled=True)))
    got = Counter(seen + rest)
    # every consumed key comes from an instance of the sequence, at most as often as drawn
    prefix = Counter()
    for n, (_, shard) in enumerate(instances):
        prefix.update(keys_of[shard])
        if not got - prefix:
            break
    assert not got - prefix
    assert sum(got.values()) == 2 * (8 + 36)
    # the first instances (read by both old ranks before the stop) were consumed in full
    first = Counter(k for _, shard in instances[:4] for k in keys_of[shard])
    assert not first - got, first - got


def _batches(pattern: str, dist1, **data):
    from trainer.config import load_config
    from trainer.data.batches import Batches

    cfg = load_config(None, ["model.preset=tiny"])
    cfg.data = _cfg(pattern, 1, **data)
    return Batches(cfg, dist1, None)


def _version1(state: dict) -> dict:
    """A rank's state as checkpoints before the layout-independent position kept it."""
    return {k: v for k, v in state.items()
            if k not in ("carry", "shuffle_buffer", "shuffle_shards")} | {"version": 1}


@pytest.mark.parametrize("resampled", [False, True])
def test_old_checkpoint_data_state(pattern, dist1, caplog, resampled):
    """A checkpoint from before (per-rank state in rank_state, no position): at the same
    layout an epoch-mode state resumes exactly; a resampled one (its shards were drawn per
    worker) or one saved at another layout gives a warning saying the rest of the epoch is
    skipped, and the next epoch starts."""
    data = {"resampled": True, "batches_per_epoch": 12} if resampled else {}
    ref = _batches(pattern, dist1, **data)
    keys = [ref.next(s)[0]["keys"] for s in range(1, 9)]
    run = _batches(pattern, dist1, **data)
    for s in range(1, 5):
        run.next(s)
    old = json.loads(json.dumps(_version1(run.loader.state_dict())))
    resumed = _batches(pattern, dist1, **data)
    resumed.resume(None, old, epoch_hint=0)
    if not resampled:
        assert [resumed.next(s)[0]["keys"] for s in range(5, 9)] == keys[4:]
    else:
        assert resumed.loader.epoch == 1 and "drew its resampled shards per worker" in caplog.text
    other = _batches(pattern, dist1, **data)
    other.resume(None, None, epoch_hint=0)  # rank_state not restored: saved at another layout
    assert other.loader.epoch == 1
    assert "was saved at another data-parallel layout: the rest of its epoch 0 cannot be " \
           "located and is skipped; starting epoch 1" in caplog.text


def test_rank_ahead_in_the_next_epoch(pattern, caplog):
    """Epoch mode without data.batches_per_epoch: 8 shards over 3 ranks give ranks 0, 1 nine
    batches and rank 2 six, so after 8 steps (the trainer starts a finished rank's next epoch)
    rank 2 is in epoch 1. A DP 3 -> 1 resume finishes epoch 0 (every sample once) and warns
    that rank 2's reads of epoch 1 will be read again."""
    loaders = _loaders(_cfg(pattern, 1), 3)
    its = [iter(loader) for loader in loaders]
    epoch0 = []
    for _ in range(8):
        for r, loader in enumerate(loaders):
            epoch = loader.epoch
            batch = next(its[r], None)
            if batch is None:  # this rank's epoch ended: the trainer starts its next one
                its[r] = iter(loader)
                epoch, batch = loader.epoch, next(its[r])
            if epoch == 0:
                epoch0 += batch["keys"]
    for it in its:
        it.close()
    position = data_position([loader.state_dict() for loader in loaders])
    assert [r["epoch"] for r in position["ranks"]] == [0, 0, 1]
    (resumed,) = _loaders(_cfg(pattern, 1), 1, position)
    rest = [k for b in resumed for k in b["keys"]]
    _check_once(epoch0 + rest, _all_keys())
    assert "ranks [2] of the checkpoint had finished epoch 0 and started the next" in caplog.text
