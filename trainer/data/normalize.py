"""CLIP image normalisation, on the loader (float batches) or on the accelerator (uint8 batches).

With `data.normalize=device` the loader hands out `images` as uint8 [B, 3, S, S] (as ffcv and
DALI do): a quarter of the bytes to collate, pin and copy. The training step then calls
`normalize_on_device` after moving the batch; the result equals the loader's float images.
"""
from __future__ import annotations

from typing import Sequence

import torch


def normalize_coefficients(mean: Sequence[float], std: Sequence[float], device=None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) [3, 1, 1] float32 with (x / 255 - mean) / std == x * scale + offset."""
    m = torch.tensor(list(mean), dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float64).view(3, 1, 1)
    scale, offset = 1.0 / (255.0 * s), -m / s
    return scale.to(device=device, dtype=torch.float32), offset.to(device=device, dtype=torch.float32)


def normalize_on_device(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (any device) -> CLIP-normalised `dtype` [B, 3, H, W].

    Float input is returned as it is (already normalised by the loader), so a step can call this
    whatever `data.normalize` says.
    """
    if images.dtype != torch.uint8:
        return images.to(dtype)
    scale, offset = normalize_coefficients(mean, std, images.device)
    # multiply, then add (two roundings, as the loader does): the same bits on every device
    out = images.to(torch.float32).mul_(scale).add_(offset)  # [B, 3, H, W] float32
    return out if dtype == torch.float32 else out.to(dtype)
