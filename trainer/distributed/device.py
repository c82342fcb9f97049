"""Where and in what precision a process computes: the one place that decides.

``train.precision``: ``bf16`` trains with bf16 parameters and activations and fp32 master
weights and optimizer state (trainer/optim.py ``MasterWeightAdamW``); ``fp32`` trains in fp32;
``auto`` is bf16 on CUDA and fp32 on CPU. The decision depends only on the flag and on whether
CUDA is present, so a CPU run with ``train.precision=bf16`` takes the dtype path a GPU run takes.
"""
from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str) -> str:
    """``auto`` | ``fp32`` | ``bf16`` -> ``fp32`` | ``bf16``."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def params_dtype_name(precision: str) -> str:
    """The ModelConfig ``params_dtype`` a training run of this precision builds."""
    return "bfloat16" if resolve_precision(precision) == "bf16" else "float32"


def eval_autocast(precision: str):
    """Evaluation forwards: bf16 autocast when the run's precision is bf16 (an fp32 model
    evaluated on a GPU computes in bf16 like its training would); nothing otherwise."""
    if resolve_precision(precision) == "bf16":
        return torch.autocast(default_device().type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
