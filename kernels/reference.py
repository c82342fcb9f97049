"""Pure-PyTorch grouped GEMM and expert MLP: the semantics every backend must match.

A loop over groups (like torchtitan's for-loop experts): clear, differentiable through plain
torch ops, and fast enough on CPU. It reads the group sizes on the host.
"""
from __future__ import annotations

import torch

from kernels.activations import activation_fn


def grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, bounds: list[tuple[int, int]],
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, K], w: [E, K, N], bias: [E, N], bounds: [(start, rows)] per group -> [T, N]."""
    total_rows, n = x.shape[0], w.shape[-1]
    # Split x, w and bias once: indexing them per group would make each group's backward
    # build a zero tensor of the whole operand (O(E^2) weight traffic per step).
    sizes, cursor = [], 0
    for start, rows in bounds:
        sizes += [start - cursor, rows]  # padding before the group, then the group
        cursor = start + rows
    sizes.append(total_rows - cursor)
    parts = x.split(sizes)
    ws = w.unbind(0)
    bs = bias.unbind(0) if bias is not None else None
    pieces = []
    for g in range(len(bounds)):
        pad, rows = parts[2 * g], parts[2 * g + 1]
        if pad.shape[0]:
            pieces.append(x.new_zeros(pad.shape[0], n))
        # Empty groups still contribute a [0, N] product so w/bias get zero (not None) grads.
        y = rows @ ws[g % len(ws)]  # [rows, N]
        if bs is not None:
            y = y + bs[g % len(bs)]
        pieces.append(y)
    if parts[-1].shape[0]:
        pieces.append(x.new_zeros(parts[-1].shape[0], n))
    if not pieces:
        return x.new_zeros(total_rows, n)
    return torch.cat(pieces)


def expert_mlp_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                         w2: torch.Tensor, b2: torch.Tensor | None,
                         bounds: list[tuple[int, int]], activation: str) -> torch.Tensor:
    """fc2(act(fc1(x))) per group; act(0) == 0 for every activation, so padding stays zero."""
    h = grouped_gemm_reference(x, w1, bounds, b1)  # [T, H]
    return grouped_gemm_reference(activation_fn(activation)(h), w2, bounds, b2)  # [T, M]
