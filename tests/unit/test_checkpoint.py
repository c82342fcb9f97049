import json
import re

import pytest
import torch

from trainer import checkpoint
from trainer.config import Config, config_to_dict


def test_save_load_manifest_and_verify(tmp_path, dist1):
    from trainer.models.clip import CLIP
    from trainer.models.state import full_state_dict

    cfg = Config()
    torch.manual_seed(0)
    model = CLIP(cfg.model, cfg.parallel)
    path = checkpoint.save_checkpoint(tmp_path / "ck", 12, model, config_to_dict(cfg), dist1)
    assert path.name == "step_00000012"
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000012"
    assert not list((tmp_path / "ck").glob("*.partial"))
    m = checkpoint.read_manifest(tmp_path / "ck")
    assert m["step"] == 12 and m["layout"]["tp"] == 1 and m["files"]
    assert m["config"]["model"]["vision"]["width"] == cfg.model.vision.width
    checkpoint.verify(path)

    torch.manual_seed(1)
    other = CLIP(cfg.model, cfg.parallel)
    checkpoint.load_model(tmp_path / "ck", other, dist1)
    a, b = full_state_dict(model, dist1), full_state_dict(other, dist1)
    assert all(torch.equal(a[k], b[k]) for k in a)

    shard = next(p for p in path.rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-4] + b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.verify(path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.resolve(tmp_path / "x")
    assert checkpoint.latest_step_dir(tmp_path / "x") is None
    latest = tmp_path / "x" / "latest"
    latest.write_text("step_00000001\n")  # the one reader of `latest`: resolve and resume
    step = tmp_path / "x" / "step_00000001"
    for reader in (checkpoint.latest_step_dir, checkpoint.resolve):
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match=f"^{re.escape(str(latest))} names {re.escape(str(step))}, "
                                 f"which does not exist$"):
            reader(tmp_path / "x")
    step.mkdir()
    assert checkpoint.latest_step_dir(tmp_path / "x") == step
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=f"^{re.escape(str(latest))} names {re.escape(str(step))}, which "
                             f"has no manifest.json$"):
        checkpoint.resolve(tmp_path / "x")
    for name in ("step_00000001.partial", "../y", "step_00000001/model"):
        latest.write_text(name + "\n")
        for reader in (checkpoint.latest_step_dir, checkpoint.resolve):
            with pytest.raises(checkpoint.CorruptCheckpointError,
                               match=f"names '{re.escape(name)}', not a step_\\* directory"):
                reader(tmp_path / "x")
    d = tmp_path / "y"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="format_version"):
        checkpoint.read_manifest(d)


# ---- full training state (optimizer, train/rank state), keep_last, crash safety
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _model(seed):
    from trainer.models.clip import CLIP

    cfg = Config()
    torch.manual_seed(seed)
    return CLIP(cfg.model, cfg.parallel), cfg


def _adamw(model, lr=1e-3):
    """Two groups with different lr and weight decay, like trainer.step.build_optimizer."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0, "lr": 2 * lr}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _fake_step(model, opt, seed, skip=()):
    """Seeded gradients (None for the parameters named in ``skip``), then an optimizer step."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.grad = None if name in skip else torch.randn(p.shape, generator=g)
    opt.step()


def test_optimizer_and_rank_state_round_trip(tmp_path, dist1):
    """Same layout: weights, moments and per-param step counts bit-exact, the next step
    bit-exact; hyperparameters stay the current optimizer's; rank_state comes back."""
    from trainer.distributed.rng import rng_state
    from trainer.models.state import full_state_dict

    model, cfg = _model(0)
    opt = _adamw(model)
    skipped = next(n for n, p in model.named_parameters() if p.ndim < 2)
    _fake_step(model, opt, 1)
    _fake_step(model, opt, 2, skip={skipped})  # per-param step counts now differ
    rank_state = {"rng": rng_state(), "data": {"shard": 3, "sample": 17}}
    train_state = {"step": 2, "consumed_samples": 64}
    checkpoint.save_checkpoint(tmp_path / "ck", 2, model, config_to_dict(cfg), dist1,
                               optimizer=opt, train_state=train_state, rank_state=rank_state)
    ckpt = tmp_path / "ck" / "step_00000002"
    assert (ckpt / "rank_state" / "rank_00000.json").is_file()
    assert any(p.parts[-2] == "optimizer" for p in ckpt.rglob("*.distcp"))

    other, _ = _model(5)
    opt2 = _adamw(other, lr=5e-4)
    manifest, got = checkpoint.load_checkpoint(tmp_path / "ck", other, dist1, optimizer=opt2)
    assert manifest["train_state"] == train_state and got == rank_state
    assert [g["lr"] for g in opt2.param_groups] == [5e-4, 1e-3]  # current groups win
    assert [g["lr"] for g in manifest["optimizer"]["param_groups"]] == [1e-3, 2e-3]
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(a) == sorted(b)
    for i in a:
        assert sorted(a[i]) == sorted(b[i])
        for k in a[i]:
            assert a[i][k].dtype == b[i][k].dtype and torch.equal(a[i][k], b[i][k]), (i, k)
    steps = {float(s["step"]) for s in b.values()}
    assert steps == {1.0, 2.0}
    _, none = checkpoint.load_checkpoint(tmp_path / "ck", _model(6)[0], dist1,
                                         load_rank_state=False)
    assert none is None

    for g in opt2.param_groups:  # the same hyperparameters for the continuation check
        g["lr"] = {0.1: 1e-3, 0.0: 2e-3}[g["weight_decay"]]
    _fake_step(model, opt, 3)
    _fake_step(other, opt2, 3)
    x, y = full_state_dict(model, dist1), full_state_dict(other, dist1)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_weights_only_checkpoint_refuses_optimizer(tmp_path, dist1):
    model, cfg = _model(0)
    checkpoint.save_checkpoint(tmp_path / "ck", 1, model, config_to_dict(cfg), dist1)
    with pytest.raises(checkpoint.CheckpointError, match="without optimizer state"):
        checkpoint.load_checkpoint(tmp_path / "ck", model, dist1, optimizer=_adamw(model))
    manifest, rank_state = checkpoint.load_checkpoint(tmp_path / "ck", model, dist1)
    assert manifest["step"] == 1 and rank_state is None


def test_keep_last(tmp_path, dist1):
    model, cfg = _model(0)
    root = tmp_path / "ck"
    save = lambda step, keep: checkpoint.save_checkpoint(  # noqa: E731
        root, step, model, config_to_dict(cfg), dist1, keep_last=keep)
    names = lambda: sorted(p.name for p in root.iterdir() if p.is_dir())  # noqa: E731
    for step in (1, 2, 3):
        save(step, 2)
    assert names() == ["step_00000002", "step_00000003"]
    save(5, 2)
    assert names() == ["step_00000003", "step_00000005"]
    save(4, 1)  # an older step saved last (a resumed run): `latest` is never deleted
    assert names() == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    (root / "step_00000009").mkdir()  # incomplete (no manifest): not ours to delete
    save(6, 1)
    assert names() == ["step_00000006", "step_00000009"]
    # a resume fell back from complete later steps (8, 9: corrupt, say) to 6: they hold no
    # keep_last slot, so step 6 stays beside the new step 7, and they are left alone
    save(8, 0)
    (root / "step_00000009" / "manifest.json").write_text("{}")
    save(7, 2)
    assert names() == ["step_00000006", "step_00000007", "step_00000008", "step_00000009"]


CRASH = """
import os, sys
import torch
from trainer import checkpoint
from trainer.config import Config, config_to_dict
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
from trainer.models.clip import CLIP
from trainer.models.state import full_state_dict

if __name__ == "__main__":
    root = sys.argv[1]
    init_distributed(read_launch_env())
    layout = ParallelLayout(1).initialize()
    cfg = Config()
    torch.manual_seed(0)
    model = CLIP(cfg.model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    checkpoint.save_checkpoint(root, 1, model, config_to_dict(cfg), layout, optimizer=opt)
    torch.save(full_state_dict(model, layout), os.path.join(root, "..", "weights1.pt"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.step()
    real = checkpoint.write_atomic

    def crash(path, text):
        if path.name == checkpoint.MANIFEST:  # every shard is on disk, the manifest is not
            os._exit(1)
        real(path, text)

    checkpoint.write_atomic = crash
    checkpoint.save_checkpoint(root, 2, model, config_to_dict(cfg), layout, optimizer=opt,
                               rank_state={"x": 1})
"""


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, dist1):
    from trainer.models.state import full_state_dict

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    root = tmp_path / "ck"
    # megatron's first save spawns a multiprocessing Manager that outlives os._exit: the
    # child gets its own process group, killed afterwards, and a file (not a pipe) for output.
    with open(tmp_path / "crash.log", "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(root)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc == 1, (tmp_path / "crash.log").read_text()[-3000:]
    partial = root / "step_00000002.partial"
    assert list((partial / "model").glob("*.distcp")) and list(
        (partial / "optimizer").glob("*.distcp")) and (partial / "rank_state").is_dir()
    assert not (partial / "manifest.json").exists()
    assert (root / "latest").read_text().strip() == "step_00000001"
    with pytest.raises(checkpoint.CheckpointError, match="interrupted save"):
        checkpoint.resolve(partial)
    checkpoint.verify(root)
    model, cfg = _model(7)
    opt = torch.optim.AdamW(model.parameters())
    manifest, _ = checkpoint.load_checkpoint(root, model, dist1, optimizer=opt)
    assert manifest["step"] == 1
    assert {float(s["step"]) for s in opt.state_dict()["state"].values()} == {1.0}
    saved = torch.load(tmp_path / "weights1.pt")
    now = full_state_dict(model, dist1)
    assert sorted(saved) == sorted(now) and all(torch.equal(saved[k], now[k]) for k in saved)

    checkpoint.save_checkpoint(root, 2, model, config_to_dict(cfg), dist1)
    assert not partial.exists() and (root / "latest").read_text().strip() == "step_00000002"


def test_corrupt_manifest_and_checksum_name_the_file(tmp_path, dist1):
    model, cfg = _model(0)
    path = checkpoint.save_checkpoint(tmp_path / "ck", 3, model, config_to_dict(cfg), dist1,
                                      rank_state={"a": 1})
    rank_file = path / "rank_state" / "rank_00000.json"
    rank_file.write_text('{"a": 2}')
    with pytest.raises(checkpoint.CheckpointError, match=f"{rank_file}: does not match"):
        checkpoint.load_checkpoint(tmp_path / "ck", model, dist1)
    shard = next((path / "model").glob("*.distcp"))
    shard.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{shard}: missing"):
        checkpoint.load_model(path, model, dist1)
    (path / "manifest.json").write_text('{"format_version": 1, "step": ')
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json: not valid JSON"):
        checkpoint.load_model(tmp_path / "ck", model, dist1)


def test_verify_sizes_only_or_contents(tmp_path, dist1):
    """One walk of the manifest: ``contents=False`` (``check_sizes``) stats each file, the
    default also hashes it; both return the manifest and name the first bad file."""
    model, cfg = _model(0)
    path = checkpoint.save_checkpoint(tmp_path / "ck", 5, model, config_to_dict(cfg), dist1,
                                      rank_state={"a": 1})
    manifest = checkpoint.read_manifest(path)
    assert checkpoint.verify(tmp_path / "ck") == manifest
    assert checkpoint.verify(path, contents=False) == checkpoint.check_sizes(path) == manifest
    rank_file = path / "rank_state" / "rank_00000.json"
    rank_file.write_text('{"a": 2}')  # same size, other bytes: only the sha256 tells
    assert checkpoint.check_sizes(path) == manifest
    assert checkpoint.verify(path, contents=False) == manifest
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=f"^{re.escape(str(rank_file))}: does not match its manifest "
                             "checksum$"):
        checkpoint.verify(path)
    shard = sorted((path / "model").glob("*.distcp"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-10])  # sorts before rank_state/: named first
    for check in (checkpoint.check_sizes, checkpoint.verify):
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match=f"^{re.escape(str(shard))}: {size - 10} bytes, its manifest "
                                 f"says {size} "):
            check(path)
    shard.unlink()
    for check in (checkpoint.check_sizes, checkpoint.verify):
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match=f"^{re.escape(str(shard))}: missing \\(listed in the "
                                 "manifest\\)$"):
            check(path)


def test_rng_round_trip(dist1):
    """Every generator: draws after a restore (from JSON) equal the draws after the capture."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from trainer.distributed.rng import rng_state, set_rng_state

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(3)
        return (random.random(), float(np.random.rand()), float(np.random.randn()),
                torch.rand(3), tracked)

    random.random(), np.random.randn(), torch.rand(1)
    state = json.loads(json.dumps(rng_state()))
    assert "megatron_tracker" in state
    first = draws()
    set_rng_state(state)
    second = draws()
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])
    assert not torch.equal(first[3], first[4])


def test_rng_snapshot_restore(dist1):
    """In memory (trainer/step_cache.py's replay): every generator draws the same after each
    restore of one snapshot, tracker streams kept as ByteTensors or as torch.Generators."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from trainer.distributed import rng

    tracker = get_cuda_rng_tracker()
    byte_states = tracker.get_states()
    names = sorted(byte_states)

    def draws():
        with tracker.fork():
            tracked = torch.rand(3)
        return (random.random(), float(np.random.randn()), torch.rand(3), tracked)

    def same(a, b):
        return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))

    snap = rng.snapshot()
    first = draws()
    rng.restore(snap)
    assert same(draws(), first)
    rng.restore(snap)  # a snapshot restores any number of times
    assert same(draws(), first) and not torch.equal(first[2], first[3])

    gens = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
    try:  # cudagraph-safe trackers keep torch.Generator objects: restored in place
        tracker.set_states(dict(gens))
        snap = rng.snapshot()
        before = [torch.rand(3, generator=gens[n]) for n in names]
        rng.restore(snap)
        assert all(tracker.get_states()[n] is gens[n] for n in names)
        assert all(torch.equal(torch.rand(3, generator=gens[n]), b)
                   for n, b in zip(names, before))
        tracker.set_states({n: gens[n] for n in names[1:]})
        with pytest.raises(ValueError, match="megatron RNG tracker streams differ"):
            rng.restore(snap)
    finally:
        tracker.set_states(byte_states)
