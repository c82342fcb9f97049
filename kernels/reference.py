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
    num_experts = w.shape[0]
    pieces, cursor = [], 0
    for g, (start, rows) in enumerate(bounds):
        if start > cursor:  # padding rows before this group
            pieces.append(x.new_zeros(start - cursor, n))
        # Empty groups still contribute a [0, N] product so w/bias get zero (not None) grads.
        y = x[start:start + rows] @ w[g % num_experts]  # [rows, N]
        if bias is not None:
            y = y + bias[g % num_experts]
        pieces.append(y)
        cursor = start + rows
    if cursor < total_rows:
        pieces.append(x.new_zeros(total_rows - cursor, n))
    if not pieces:
        return x.new_zeros(total_rows, n)
    return torch.cat(pieces)


def expert_mlp_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                         w2: torch.Tensor, b2: torch.Tensor | None,
                         bounds: list[tuple[int, int]], activation: str) -> torch.Tensor:
    """fc2(act(fc1(x))) per group; act(0) == 0 for every activation, so padding stays zero."""
    h = grouped_gemm_reference(x, w1, bounds, b1)  # [T, H]
    return grouped_gemm_reference(activation_fn(activation)(h), w2, bounds, b2)  # [T, M]
