"""train.wandb (trainer/wandb_logger.py through trainer/metrics.py), offline: WANDB_MODE=offline
and W&B's server address pointed at a closed local port, so a run that tried the network
would fail. The offline run file is read back (tests/wandb_records.py): every logged step
holds exactly the scalars of metrics.jsonl (flattened as TensorBoard names them) and the run
holds the resolved config; a restart continues the same run id. The 2-rank trainer run
(tests/distributed/test_train_run.py) checks the same through the real loop, rank 0 only."""
import json
import time

import pytest

import wandb_records
from trainer.config import ConfigError, WandbConfig, load_config
from trainer.metrics import MetricsLogger, _flatten

STEPS = {1: {"loss": 2.5, "lr": 1e-3, "moe": {"vision.1": {"load": [0.25, 0.75],
                                                         "dropped": 0.125}},
             "moe/backend_calls": {"reference": 4}},
         2: {"loss": 2.25, "lr": 2e-3, "eval/zero_shot_top1": 0.5}}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_offline_run_holds_our_scalars_and_config(tmp_path, offline):
    config = {"model": {"embed_dim": 32}, "train": {"lr": 1e-3}}
    cfg = WandbConfig(project="upclip-test", tags=["unit"])
    logger = MetricsLogger(tmp_path, True, 2, 0, tensorboard=False, progress_bar=False,
                           wandb=cfg, config=config)
    for step, metrics in STEPS.items():
        logger.log(step, metrics)
    logger.close()
    (run,) = wandb_records.offline_runs(tmp_path)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run.name == f"run-{run_id}.wandb"
    jsonl = {r.pop("step"): r for r in map(json.loads,
                                           (tmp_path / "metrics.jsonl").read_text().splitlines())}
    got = wandb_records.history(run)
    assert got == {s: _flatten(m) for s, m in jsonl.items()}
    assert got[1]["moe/vision.1/load/1"] == 0.75 and got[2]["eval/zero_shot_top1"] == 0.5
    assert wandb_records.config(run)["model"] == {"embed_dim": 32}

    # wandb names a run directory by the local second the run started (offline-run-%Y%m%d_%H%M%S-id):
    # a restart within that second would reuse (and overwrite) the first process's file
    stamp = run.parent.name.split("-")[2]
    deadline = time.time() + 5
    while time.strftime("%Y%m%d_%H%M%S") <= stamp and time.time() < deadline:
        time.sleep(0.05)
    logger = MetricsLogger(tmp_path, True, 4, 2, tensorboard=False, progress_bar=False,
                           wandb=cfg, config=config)  # a restarted job
    logger.log(3, {"loss": 2.0})
    logger.close()
    runs = wandb_records.offline_runs(tmp_path)  # one file per process, the same run id
    assert len(runs) == 2 and {r.name for r in runs} == {f"run-{run_id}.wandb"}
    merged = {s: m for r in runs for s, m in wandb_records.history(r).items()}
    assert sorted(merged) == [1, 2, 3] and merged[3] == {"loss": 2.0}


def test_off_by_default_and_modes_checked(tmp_path):
    logger = MetricsLogger(tmp_path, True, 1, 0, tensorboard=False, progress_bar=False,
                           wandb=WandbConfig(), config={})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()
    assert not WandbConfig(project="p", mode="disabled").enabled
    with pytest.raises(ConfigError, match=r"train.wandb.mode='ofline': expected one of "
                                          r"online, offline, disabled \(or empty\)"):
        load_config(None, ["train.wandb.project=p", "train.wandb.mode=ofline"])


def test_enabled_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, ["train.wandb.project=upclip-test"])
    with pytest.raises(ConfigError, match=r"train.wandb.project='upclip-test' but wandb is not "
                                          r"installed \(pip install wandb"):
        cfg.train.wandb.check_installed("train.wandb")
    WandbConfig().check_installed("train.wandb")  # off: no package needed
