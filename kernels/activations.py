"""Activations: the project's one table (name -> torch function, CUDA id). Ids are shared with
csrc/launchers.h (enum class Act)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


# name -> (reference function, CUDA id). "gelu" is the exact erf form (torch.nn.GELU(), open_clip
# ViTs); "quick_gelu" is x * sigmoid(1.702 x) (OpenAI CLIP checkpoints). The one activation
# table of the project: the megatron towers, the plain model (trainer/hub.py) and the expert
# kernels all look names up here.
_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "gelu": (F.gelu, 1),
    "quick_gelu": (quick_gelu, 2),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def _lookup(name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"kernels: unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return _ACTIVATIONS[name]


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of an activation name (ValueError for an unknown one)."""
    return _lookup(name)[0]


def activation_id(name: str) -> int:
    return _lookup(name)[1]
