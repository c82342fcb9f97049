"""Row groups: argument checks (host-side, no sync) and the host group bounds of the reference.

A 2-D activation x: [T, K] holds G row groups; group g multiplies expert weight g % E.
  stride=None  groups are consecutive from row 0: group g is rows [c_0 + ... + c_{g-1}, + c_g).
               Needs sum(counts) <= T.
  stride=C     group g is rows [g*C, g*C + c_g): the DeepSpeed capacity layout, where
               `[ep, E_local, C, M]` reshapes (a view) to [ep*E_local*C, M], counts is
               [ep, E_local] (flattened, G = ep*E_local) and group g = src*E_local + e uses
               weight e = g % E_local. Needs c_g <= C and G*C <= T.
Rows in no group (capacity padding, rows past the last group) produce zeros and get zero grad.
The reference checks the count preconditions and raises; the CUDA path cannot read the counts
without a host sync, so it clamps them instead (it never reads or writes out of bounds).
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_counts(counts: torch.Tensor, total_rows: int, num_experts: int,
                 stride: int | None) -> torch.Tensor:
    """Validate what is known on the host and return counts flattened to [G]."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"kernels: counts must be an integer tensor, got {type(counts).__name__}")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"kernels: counts must be an integer tensor, got {counts.dtype}")
    counts = counts.reshape(-1)
    groups = counts.numel()
    if num_experts < 1 or groups % num_experts:
        raise ValueError(f"kernels: {groups} groups (counts {tuple(counts.shape)}) is not a "
                         f"multiple of {num_experts} experts (group g uses expert g % E)")
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"kernels: stride must be a positive int or None, got {stride!r}")
        if groups * stride > total_rows:
            raise ValueError(f"kernels: {groups} groups x stride {stride} = "
                             f"{groups * stride} rows, but x has {total_rows} rows")
    return counts


def host_bounds(counts: torch.Tensor, total_rows: int,
                stride: int | None) -> list[tuple[int, int]]:
    """[(start, rows)] per group. Reads counts on the host (a sync for CUDA counts)."""
    values = [int(c) for c in counts.tolist()]
    bad = [(g, c) for g, c in enumerate(values) if c < 0 or (stride is not None and c > stride)]
    if bad:
        limit = f" or > stride {stride}" if stride is not None else ""
        raise ValueError(f"kernels: counts < 0{limit} at (group, count) {bad[:8]}")
    if stride is not None:
        return [(g * stride, c) for g, c in enumerate(values)]
    if sum(values) > total_rows:
        raise ValueError(f"kernels: counts sum to {sum(values)} but x has {total_rows} rows")
    bounds, start = [], 0
    for c in values:
        bounds.append((start, c))
        start += c
    return bounds


def linear_weights_to_grouped(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear weights [out, in] (one per expert) -> (w [E, in, out], b [E, out])."""
    w = torch.stack([wt.t() for wt in weights]).contiguous()
    b = torch.stack(list(biases)).contiguous() if biases is not None else None
    return w, b
