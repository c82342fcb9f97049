"""CUDA extension vs the PyTorch reference (needs a GPU and `python -m kernels.build`).

Fresh random inputs every run (the seed is printed in failures). Before each extension call the
caching allocator is poisoned with NaN blocks of the output sizes, so any output element the
kernels forget to write (padding rows, empty groups) shows up as NaN. Tolerance: relative
Frobenius error vs a float32 reference on the same 16-bit inputs, 2e-2 for bf16 (8-bit mantissa,
3.9e-3 per rounding, up to ~4 roundings in the MLP) and 5e-3 for fp16.
"""
from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels import expert_mlp, grouped_gemm

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.cuda.is_available() and not kernels.extension_available(),
                       reason="CUDA extension not built (python -m kernels.build)"),
]

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
SEED = int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def gen():
    g = torch.Generator(device="cuda")
    g.manual_seed(SEED)
    return g


def randn(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


def poison(*shapes, dtype):
    """Leave NaN-filled blocks of these sizes in the caching allocator for the next torch.empty."""
    blocks = [torch.full(s, float("nan"), device="cuda", dtype=dtype) for s in shapes]
    del blocks


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), f"non-finite output (seed {SEED})"
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def check(got, want, dtype, what):
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]} (seed {SEED})"


def counts_for(kind: str, groups: int, rows: int, gen) -> list[int]:
    if kind == "balanced":
        return [rows // groups] * groups
    if kind == "skewed":  # one giant group, several empty ones, the rest small and odd
        c = [0] * groups
        c[1] = rows - 7 * (groups // 2)
        for g in range(3, groups, 2):
            c[g] = 7
        return c
    if kind == "empty":
        return [0] * groups
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["balanced", "skewed", "empty"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_gemm_forward_backward(dtype, kind, with_bias, gen):
    if dtype == torch.float16 and "float16" not in _built_dtypes():
        pytest.skip("fp16 not in this build (--reduced)")
    experts, k, n, rows = 8, 256, 384, 2048
    counts = torch.tensor(counts_for(kind, experts, rows, gen), device="cuda")
    x = randn(rows + 5, k, gen=gen, dtype=dtype).requires_grad_()  # 5 trailing uncovered rows
    w = randn(experts, k, n, gen=gen, dtype=dtype, scale=k ** -0.5).requires_grad_()
    b = randn(experts, n, gen=gen, dtype=dtype).requires_grad_() if with_bias else None
    dy = randn(rows + 5, n, gen=gen, dtype=dtype)

    poison((rows + 5, n), (rows + 5, k), (experts, k, n), dtype=dtype)
    y = grouped_gemm(x, w, counts, bias=b, backend="cuda")
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)

    ref_in = [t.detach().float().requires_grad_() if t is not None else None for t in (x, w, b)]
    y_ref = grouped_gemm(ref_in[0], ref_in[1], counts, bias=ref_in[2], backend="reference")
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None], dy.float())

    assert torch.all(y[counts.sum():] == 0), "uncovered rows must be zero"
    if kind == "empty":
        assert torch.all(y == 0) and all(torch.all(g == 0) for g in grads)
        return
    check(y, y_ref, dtype, "y")
    for name, got, want in zip(["dx", "dw", "db"], grads, ref_grads):
        check(got, want, dtype, name)


def _built_dtypes() -> set[str]:
    from kernels import _ext

    return set(_ext.extension().build_info()["dtypes"])


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("layout", ["compact_skewed", "capacity"])
def test_expert_mlp_forward_backward(activation, layout, gen):
    dtype, m, h = torch.bfloat16, 256, 1024
    if layout == "capacity":  # DeepSpeed [ep, E_local, C, M] with zero padding after the tokens
        ep, e_local, cap = 2, 4, 96
        counts = torch.randint(0, cap + 1, (ep, e_local), device="cuda", generator=gen)
        counts[0, 1] = 0
        counts[1, 2] = cap
        x = randn(ep, e_local, cap, m, gen=gen, dtype=dtype)
        valid = torch.arange(cap, device="cuda") < counts[..., None]  # [ep, E_local, C]
        x = x.masked_fill(~valid[..., None], 0.0)
        stride, experts = cap, e_local
    else:
        experts = 8
        counts = torch.tensor(counts_for("skewed", experts, 3000, gen), device="cuda")
        x = randn(3000, m, gen=gen, dtype=dtype)
        valid = torch.ones(3000, dtype=torch.bool, device="cuda")
        stride = None
    x.requires_grad_()
    params = [randn(experts, m, h, gen=gen, dtype=dtype, scale=m ** -0.5),
              randn(experts, h, gen=gen, dtype=dtype, scale=0.1),
              randn(experts, h, m, gen=gen, dtype=dtype, scale=h ** -0.5),
              randn(experts, m, gen=gen, dtype=dtype, scale=0.1)]
    params = [p.requires_grad_() for p in params]
    dy = randn(*x.shape, gen=gen, dtype=dtype)

    rows = x.numel() // m
    poison((rows, h), (rows, h), (rows, m), (experts * 2, m, h), dtype=dtype)
    y = expert_mlp(x, *params, counts, stride=stride, activation=activation, backend="cuda")
    grads = torch.autograd.grad(y, [x, *params], dy)

    ref_in = [t.detach().float().requires_grad_() for t in [x, *params]]
    y_ref = expert_mlp(*ref_in, counts, stride=stride, activation=activation,
                       backend="reference")
    ref_grads = torch.autograd.grad(y_ref, ref_in, dy.float())

    assert torch.all(y[~valid] == 0), "padding rows must be zero"
    assert torch.all(grads[0][~valid] == 0), "padding rows must get zero grad"
    check(y, y_ref, dtype, "y")
    for name, got, want in zip(["dx", "dw1", "db1", "dw2", "db2"], grads, ref_grads):
        check(got, want, dtype, name)


def test_no_host_sync(gen):
    """Device counts in, no synchronizing CUDA call anywhere in forward or backward."""
    dtype, experts, m, h = torch.bfloat16, 4, 128, 256
    counts = torch.tensor([100, 0, 37, 300], device="cuda")
    x = randn(437, m, gen=gen, dtype=dtype).requires_grad_()
    w1 = randn(experts, m, h, gen=gen, dtype=dtype).requires_grad_()
    w2 = randn(experts, h, m, gen=gen, dtype=dtype).requires_grad_()
    expert_mlp(x, w1, None, w2, None, counts, backend="cuda").sum().backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = expert_mlp(x, w1, None, w2, None, counts, backend="cuda")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_auto_uses_the_extension_and_falls_back_for_fp32(gen):
    x = randn(64, 64, gen=gen, dtype=torch.float32)
    w = randn(2, 64, 64, gen=gen, dtype=torch.float32)
    counts = torch.tensor([30, 34], device="cuda")
    torch.testing.assert_close(grouped_gemm(x, w, counts),
                               grouped_gemm(x, w, counts, backend="reference"))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        grouped_gemm(x, w, counts, backend="cuda")
