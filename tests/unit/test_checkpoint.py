import json

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
    (tmp_path / "x" / "latest").write_text("step_00000001\n")
    with pytest.raises(checkpoint.CheckpointError, match="no manifest.json"):
        checkpoint.resolve(tmp_path / "x")
    d = tmp_path / "y"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="format_version"):
        checkpoint.read_manifest(d)
