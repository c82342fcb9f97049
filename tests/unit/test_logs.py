"""trainer/distributed/logs.py: the known-benign filters drop exactly their messages (an
unknown warning from the same module or logger still prints); INFO from rank 0 only,
warnings from every rank; DS_ACCELERATOR is named before DeepSpeed picks one. The 2-rank
training run (tests/distributed/test_train_run.py test_logs_are_quiet) checks the whole log."""
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trainer.distributed import logs

ROOT = Path(__file__).resolve().parents[2]


def warn_from(module: str, message: str, category=UserWarning) -> list[str]:
    """Warnings that reach the user when ``module`` warns ``message``."""
    code = compile(f"warnings.warn({message!r}, {category.__name__})", module, "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        logs.install_filters()
        exec(code, {"__name__": module, "warnings": warnings, category.__name__: category})
    return [str(w.message) for w in caught]


def test_benign_warnings_only():
    apex = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert warn_from("megatron.core.optimizer", apex) == []
    assert warn_from("megatron.core.models.backends",
                     "Apex is not installed. Falling back to Torch Norm") == []
    assert warn_from("trainer.models.clip", apex) == [apex]  # only megatron's own
    assert warn_from("megatron.core.optimizer", "something new") == ["something new"]
    old = "`load_state_dict` is deprecated and will be removed in future versions."
    assert warn_from("megatron.core.dist_checkpointing.strategies.torch", old,
                     FutureWarning) == []
    assert warn_from("megatron.core.dist_checkpointing.strategies.torch", "other",
                     FutureWarning) == ["other"]


def test_benign_log_records_only(caplog):
    logs.install_filters()
    layer = logging.getLogger("megatron.core.transformer.transformer_layer")
    with caplog.at_level(logging.WARNING):
        layer.warning("Unknown MLP type: <class 'x'>. Using default kwargs.")
        layer.warning("something else")
        logging.getLogger("torch.utils.cpp_extension").warning(
            "No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def record(level: int) -> logging.LogRecord:
    return logging.LogRecord("upclip", level, __file__, 1, "m", None, None)


def test_info_from_rank_zero_warnings_from_all():
    zero, one = logs.RankZeroInfo(0), logs.RankZeroInfo(1)
    assert zero.filter(record(logging.INFO)) and zero.filter(record(logging.WARNING))
    assert not one.filter(record(logging.INFO)) and one.filter(record(logging.WARNING))
    assert one.filter(record(logging.ERROR))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only: DeepSpeed finds CUDA itself")
def test_deepspeed_accelerator_named_before_import():
    """A process importing our MoE router (and so DeepSpeed) gets DS_ACCELERATOR=cpu on a
    machine without CUDA, and DeepSpeed's "Setting accelerator to CPU" warning never prints."""
    code = ("import os, torch; from trainer.moe import router; "
            "from deepspeed.accelerator import get_accelerator; get_accelerator(); "
            "print(os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["cpu", "False"]
    assert "Setting accelerator" not in p.stderr, p.stderr


def test_optional_dependencies_one_line():
    line = logs.optional_dependencies()
    assert "apex: not installed" in line and "transformer_engine: not installed" in line
    assert "\n" not in line


def test_warnings_say_so_and_name_the_rank():
    record = logging.LogRecord("upclip", logging.WARNING, __file__, 1, "disk %d%% full",
                               (95,), None)
    assert logs.LevelFormatter(0).format(record).endswith("] WARNING: disk 95% full")
    assert " rank 3] WARNING: disk 95% full" in logs.LevelFormatter(3).format(record)
    record.levelno, record.levelname = logging.INFO, "INFO"
    assert logs.LevelFormatter(0).format(record).endswith("] disk 95% full")
