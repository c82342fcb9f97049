"""Which checkpoint a run resumes from (trainer/resume.py): ``latest`` when it verifies, else
the newest checkpoint that does, with one warning; none usable -> ResumeError; an empty or
never-completed save_dir -> a fresh start. The end-to-end run (losses equal to an
uninterrupted run after the fallback) is tests/distributed/test_train_run.py."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from trainer import checkpoint, resume
from trainer.config import Config, config_to_dict


@pytest.fixture(scope="module")
def saved(tmp_path_factory, dist1):
    """step_2, step_4, step_6 of one model (different weights each), with optimizer state,
    and the full state dict saved at each step."""
    from trainer.models.clip import CLIP
    from trainer.models.state import full_state_dict

    cfg = Config()
    torch.manual_seed(0)
    model = CLIP(cfg.model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path_factory.mktemp("resume") / "ck"
    weights = {}
    for step in (2, 4, 6):
        for p in model.parameters():
            p.grad = torch.full_like(p, float(step))
        opt.step()
        checkpoint.save_checkpoint(root, step, model, config_to_dict(cfg), dist1, optimizer=opt,
                                   train_state={"step": step}, rank_state={"step": step})
        weights[step] = {k: v.clone() for k, v in full_state_dict(model, dist1).items()}
    return root, weights


def _load(root, dist1):
    from trainer.models.clip import CLIP
    from trainer.models.state import full_state_dict

    cfg = Config()
    torch.manual_seed(9)
    model = CLIP(cfg.model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters())
    path, manifest, rank_state = resume.load_newest_good(root, model, dist1, optimizer=opt)
    return path, manifest, rank_state, full_state_dict(model, dist1)


def _shard(d):
    return sorted((d / "model").glob("*.distcp"))[0]


def _no_manifest(root):
    (root / "step_00000006" / "manifest.json").unlink()


def _missing_dir(root):
    (root / "latest").write_text("step_00000008\n")


def _truncated(root):
    shard = _shard(root / "step_00000006")
    shard.write_bytes(shard.read_bytes()[:-100])


def _altered(root):  # same size: only the sha256 tells
    shard = _shard(root / "step_00000006")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("breakage,resumed,problem", [
    (None, 6, None),
    (_no_manifest, 4, "step_00000006: no manifest.json"),
    (_missing_dir, 6, "latest names {root}/step_00000008, which does not exist"),
    (_truncated, 4, "bytes, its manifest says"),
    (_altered, 4, "does not match its manifest checksum"),
])
def test_broken_latest_falls_back_to_the_newest_good(saved, tmp_path, dist1, caplog, breakage,
                                                    resumed, problem):
    src, weights = saved
    root = tmp_path / "ck"
    shutil.copytree(src, root)
    if breakage:
        breakage(root)
    with caplog.at_level(logging.WARNING, logger="upclip"):
        path, manifest, rank_state, state = _load(root, dist1)
    assert path.name == f"step_{resumed:08d}" and manifest["step"] == resumed
    assert manifest["train_state"] == {"step": resumed} and rank_state == {"step": resumed}
    assert sorted(state) == sorted(weights[resumed])
    assert all(torch.equal(state[k], weights[resumed][k]) for k in state)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if problem is None:
        assert warnings == []
    else:  # one warning, naming what was wrong and what was resumed instead
        assert len(warnings) == 1, warnings
        assert problem.format(root=root) in warnings[0], warnings[0]
        assert f"resuming from {root / path.name}, the newest checkpoint that verifies" \
            in warnings[0]


def test_no_usable_checkpoint_is_an_error_naming_them(saved, tmp_path, dist1):
    src, _ = saved
    root = tmp_path / "ck"
    shutil.copytree(src, root)
    (root / "step_00000006" / "manifest.json").unlink()
    _truncated_4 = _shard(root / "step_00000004")
    _truncated_4.write_bytes(b"")
    shutil.rmtree(root / "step_00000002" / "optimizer")
    with pytest.raises(resume.ResumeError) as e:
        _load(root, dist1)
    msg = str(e.value)
    assert "\n" not in msg
    assert (f"checkpoint.save_dir='{root}' holds checkpoints but none can be resumed from "
            "(step directories: step_00000006, step_00000004, step_00000002)") in msg, msg
    assert "step_00000006: no manifest.json" in msg and f"{_truncated_4}: 0 bytes" in msg
    assert "step_00000002/optimizer/" in msg and "missing (listed in the manifest)" in msg
    assert msg.endswith("or pass checkpoint.resume=false to start over there")


def test_resume_root(tmp_path, dist1, caplog):
    root = tmp_path / "ck"
    assert resume.resume_root(root) is None  # not there yet
    root.mkdir()
    (root / "step_00000002.partial").mkdir()  # an interrupted first save: nothing was complete
    assert resume.resume_root(root) is None
    (root / "step_00000002").mkdir()  # a step directory, complete or not: resume (or fail)
    assert resume.resume_root(root) == root
    with caplog.at_level(logging.WARNING, logger="upclip"):
        assert resume.resume_root(root, resume=False) is None
    assert "checkpoint.resume=false: starting over although" in caplog.text
    shutil.rmtree(root / "step_00000002")
    (root / "latest").write_text("step_00000002\n")  # the checkpoint it named is gone
    assert resume.resume_root(root) == root
    with pytest.raises(resume.ResumeError, match=r"\(step directories: none\): .*latest names "
                       r".*step_00000002, which does not exist"):
        _load(root, dist1)
