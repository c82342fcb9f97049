"""Autograd over the CUDA extension ops (csrc/bindings.cpp). Inputs are already checked.

Forward and backward per grouped linear layer (weights [E, K, N], groups g -> expert g % E):
  y  = x @ w + b                fprop GEMM, then bias (+ activation) and zeroed padding rows
  dx = dy @ w^T                 dgrad GEMM, padding rows zeroed
  dw = x^T @ dy per group       wgrad GEMM (ragged reduction), summed over groups of one expert
  db = column sums of dy per group
The expert MLP keeps the pre-activation h (with bias) for backward and recomputes act(h) there.
"""
from __future__ import annotations

import torch

from kernels import _ext


def group_layout(counts: torch.Tensor, x: torch.Tensor, stride: int | None) -> torch.Tensor:
    """int32 [2, G] (starts, rows) computed on x's device: no host sync."""
    counts = counts.to(device=x.device, dtype=torch.int32).contiguous()
    return _ext.extension().group_layout(counts, x.shape[0], stride or 0)


def _per_expert(per_group: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, ...] -> [E, ...], summing groups g, g + E, g + 2E, ... (the ep source ranks)."""
    groups = per_group.shape[0]
    if groups == num_experts:
        return per_group.to(dtype)
    stacked = per_group.view(groups // num_experts, num_experts, *per_group.shape[1:])
    return stacked.sum(0, dtype=torch.float32).to(dtype)


class GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, layout):
        ext = _ext.extension()
        y = ext.gmm_fprop(x, w, layout)  # [T, N], padding rows unwritten
        ext.bias_act(y, bias, layout, 0)  # + bias, padding rows -> 0
        ctx.save_for_backward(x, w, layout)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        ext = _ext.extension()
        x, w, layout = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = ext.gmm_dgrad(dy, w, layout)  # [T, K]
            ext.zero_uncovered_rows(dx, layout)
        if ctx.needs_input_grad[1]:
            dw = _per_expert(ext.gmm_wgrad(x, dy, layout), w.shape[0], w.dtype)  # [E, K, N]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _per_expert(ext.group_row_sum(dy, layout), w.shape[0], dy.dtype)  # [E, N]
        return dx, dw, db, None


class ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, layout, act_id):
        ext = _ext.extension()
        h = ext.gmm_fprop(x, w1, layout)  # [T, H]
        a = ext.bias_act(h, b1, layout, act_id)  # h += b1 in place; a = act(h); padding -> 0
        y = ext.gmm_fprop(a, w2, layout)  # [T, M]
        ext.bias_act(y, b2, layout, 0)
        ctx.save_for_backward(x, w1, w2, h, layout)
        ctx.act_id = act_id
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        ext = _ext.extension()
        x, w1, w2, h, layout = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        experts = w1.shape[0]
        dy = dy.contiguous()
        dx = dw1 = db1 = dw2 = db2 = None
        dh = ext.gmm_dgrad(dy, w2, layout)  # dL/da [T, H]
        a = ext.act_backward(dh, h, layout, ctx.act_id)  # dh <- dh * act'(h); a = act(h)
        if need_w2:
            dw2 = _per_expert(ext.gmm_wgrad(a, dy, layout), experts, w2.dtype)
        del a
        if ctx.has_bias[1] and need_b2:
            db2 = _per_expert(ext.group_row_sum(dy, layout), experts, dy.dtype)
        if need_w1:
            dw1 = _per_expert(ext.gmm_wgrad(x, dh, layout), experts, w1.dtype)
        if ctx.has_bias[0] and need_b1:
            db1 = _per_expert(ext.group_row_sum(dh, layout), experts, dh.dtype)
        if need_x:
            dx = ext.gmm_dgrad(dh, w1, layout)  # [T, M]
            ext.zero_uncovered_rows(dx, layout)
        return dx, dw1, db1, dw2, db2, None, None
