"""kernels/ on CPU: the reference against an explicit float64 loop, gradients, errors, import.

Tolerances: float32 outputs compare to a float64 loop with rtol=atol=1e-5 (fp32 dot products of
at most 16 terms, relative error ~1e-6); float32 weight gradients sum up to 300 rows of O(10)
products, so they get rtol=atol=1e-4; gradcheck runs in float64 with its defaults (eps 1e-6,
atol 1e-5, rtol 1e-3); the bf16 case allows 2e-2 relative error (bf16 keeps 8 bits: 3.9e-3 per
rounding, a few roundings per output). Padding rows must be exactly zero.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import ExtensionNotBuiltError, expert_mlp, grouped_gemm
from kernels import _ext

REPO = Path(__file__).resolve().parents[2]


def bounds_of(counts: list[int], stride: int | None) -> list[tuple[int, int]]:
    if stride is not None:
        return [(g * stride, c) for g, c in enumerate(counts)]
    starts = [sum(counts[:g]) for g in range(len(counts))]
    return list(zip(starts, counts))


def loop_gemm64(x, w, counts, stride, bias=None):
    """Explicit float64 loop over groups; rows in no group stay zero."""
    x2d = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros(x2d.shape[0], w.shape[2], dtype=torch.float64)
    for g, (start, rows) in enumerate(bounds_of(counts, stride)):
        e = g % w.shape[0]
        for r in range(start, start + rows):
            out[r] = x2d[r] @ w[e].double() + (bias[e].double() if bias is not None else 0.0)
    return out.reshape(*x.shape[:-1], w.shape[2])


def gelu64(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2.0 ** 0.5))


def quick_gelu64(x):
    return x / (1.0 + torch.exp(-1.702 * x))


ACT64 = {"gelu": gelu64, "quick_gelu": quick_gelu64}


def loop_mlp64(x, w1, b1, w2, b2, counts, stride, activation):
    h = loop_gemm64(x, w1, counts, stride, b1)
    return loop_gemm64(ACT64[activation](h), w2, counts, stride, b2)


def rand(*shape, dtype=torch.float32, requires_grad=False, gen=None):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


# (name, counts (nested list = [ep, E_local]), experts E, stride, x leading shape, K, N)
CASES = [
    ("empty_groups", [3, 0, 5, 0], 4, None, (8,), 5, 7),
    ("odd_sizes_trailing_rows", [1, 7, 3], 3, None, (15,), 13, 9),
    ("one_giant_group", [0, 300, 0, 1], 2, None, (301,), 16, 8),
    ("all_empty", [0, 0], 2, None, (4,), 8, 8),
    ("capacity_layout", [[2, 6, 0], [5, 1, 3]], 3, 6, (2, 3, 6), 11, 6),
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("name,counts,experts,stride,lead,k,n", CASES, ids=[c[0] for c in CASES])
def test_grouped_gemm_matches_float64_loop(name, counts, experts, stride, lead, k, n, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = rand(*lead, k, gen=gen)
    w = rand(experts, k, n, gen=gen)
    b = rand(experts, n, gen=gen) if with_bias else None
    c = torch.tensor(counts, dtype=torch.int64)
    y = grouped_gemm(x, w, c, bias=b, stride=stride)
    assert y.shape == (*lead, n) and y.dtype == x.dtype
    flat = [int(v) for v in c.reshape(-1)]
    torch.testing.assert_close(y.double(), loop_gemm64(x, w, flat, stride, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("name,counts,experts,stride,lead,k,n", CASES, ids=[c[0] for c in CASES])
def test_expert_mlp_matches_float64_loop(name, counts, experts, stride, lead, k, n, activation):
    gen = torch.Generator().manual_seed(1)
    hidden = 12
    x = rand(*lead, k, requires_grad=True, gen=gen)
    params = [rand(experts, k, hidden, gen=gen), rand(experts, hidden, gen=gen),
              rand(experts, hidden, n, gen=gen), rand(experts, n, gen=gen)]
    params = [p.requires_grad_() for p in params]
    flat = [int(v) for v in torch.tensor(counts).reshape(-1)]
    y = expert_mlp(x, *params, torch.tensor(counts), stride=stride, activation=activation)

    inputs64 = [t.detach().double().requires_grad_() for t in [x, *params]]
    y64 = loop_mlp64(*inputs64, flat, stride, activation)
    y64 = y64 + 0.0 * sum(t.sum() for t in inputs64)  # keep a graph when every group is empty
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)

    grad = rand(*y.shape, gen=gen)
    y.backward(grad)
    y64.backward(grad.double())
    for got, want in zip([x, *params], inputs64):
        assert got.grad is not None  # experts with no rows get zeros, not None
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_capacity_padding_rows_are_zero_and_get_zero_grad():
    """DeepSpeed [ep, E_local, C, M]: garbage in padding rows never leaks into anything."""
    gen = torch.Generator().manual_seed(2)
    ep, e_local, cap, m, hidden = 2, 2, 5, 8, 16
    counts = torch.tensor([[3, 0], [5, 1]])
    x = rand(ep, e_local, cap, m, gen=gen)
    valid = torch.zeros(ep, e_local, cap, dtype=torch.bool)
    for (i, j), c in zip([(0, 0), (0, 1), (1, 0), (1, 1)], counts.reshape(-1).tolist()):
        valid[i, j, :c] = True
    x = x.masked_fill(~valid[..., None], 1e4).requires_grad_()  # poison the padding rows
    w1, b1 = rand(e_local, m, hidden, gen=gen), rand(e_local, hidden, gen=gen)
    w2, b2 = rand(e_local, hidden, m, gen=gen), rand(e_local, m, gen=gen)
    y = expert_mlp(x, w1, b1, w2, b2, counts, stride=cap, activation="quick_gelu")
    assert torch.all(y[~valid] == 0)
    y.backward(torch.ones_like(y))  # padding rows receive gradient from outside ...
    assert torch.all(x.grad[~valid] == 0)  # ... and pass none of it on
    assert torch.isfinite(x.grad).all()

    clean = x.detach().masked_fill(~valid[..., None], 0.0)
    y_clean = expert_mlp(clean, w1, b1, w2, b2, counts, stride=cap, activation="quick_gelu")
    torch.testing.assert_close(y, y_clean, rtol=0, atol=0)


def test_gradcheck_grouped_gemm():
    gen = torch.Generator().manual_seed(3)
    for counts, stride, rows in [([2, 0, 3], None, 6), ([1, 3, 0, 2], 3, 13)]:
        x = rand(rows, 4, dtype=torch.float64, requires_grad=True, gen=gen)
        w = rand(len(counts) // (2 if stride else 1), 4, 3, dtype=torch.float64,
                 requires_grad=True, gen=gen)
        b = rand(w.shape[0], 3, dtype=torch.float64, requires_grad=True, gen=gen)
        c = torch.tensor(counts)
        assert torch.autograd.gradcheck(
            lambda x, w, b: grouped_gemm(x, w, c, bias=b, stride=stride), (x, w, b))


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_gradcheck_expert_mlp(activation):
    gen = torch.Generator().manual_seed(4)
    counts, stride = torch.tensor([[2, 0], [1, 3]]), 3
    x = rand(13, 4, dtype=torch.float64, requires_grad=True, gen=gen)
    params = [rand(2, 4, 5, dtype=torch.float64, requires_grad=True, gen=gen),
              rand(2, 5, dtype=torch.float64, requires_grad=True, gen=gen),
              rand(2, 5, 3, dtype=torch.float64, requires_grad=True, gen=gen),
              rand(2, 3, dtype=torch.float64, requires_grad=True, gen=gen)]
    assert torch.autograd.gradcheck(
        lambda *t: expert_mlp(*t, counts, stride=stride, activation=activation), (x, *params))


def test_bfloat16_small_case():
    gen = torch.Generator().manual_seed(5)
    counts = [5, 0, 9]
    x, w, b = rand(16, 32, gen=gen), rand(3, 32, 24, gen=gen), rand(3, 24, gen=gen)
    y = grouped_gemm(x.bfloat16(), w.bfloat16(), torch.tensor(counts), bias=b.bfloat16(),
                     backend="reference")  # "auto" takes torch's grouped mm for bf16 on CPU
    assert y.dtype == torch.bfloat16
    want = loop_gemm64(x.bfloat16(), w.bfloat16(), counts, None, b.bfloat16())
    assert ((y.double() - want).norm() / want.norm()).item() < 2e-2


def test_no_bias_and_consistent_backends_on_cpu():
    gen = torch.Generator().manual_seed(6)
    x, w = rand(9, 8, gen=gen), rand(2, 8, 8, gen=gen)
    c = torch.tensor([4, 5])
    torch.testing.assert_close(grouped_gemm(x, w, c), grouped_gemm(x, w, c, backend="reference"))
    # on CPU "auto" IS the reference, so the line above cannot fail: "auto" (forward and
    # gradients, no bias) against the independent float64 loop
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    before = kernels.api.BACKEND_CALLS.copy()
    y = grouped_gemm(xg, wg, c)
    assert kernels.api.BACKEND_CALLS - before == {("grouped_gemm", "reference"): 1}
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = loop_gemm64(x64, w64, [4, 5], None)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    dy = rand(*y.shape, gen=gen)
    y.backward(dy)
    y64.backward(dy.double())
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wg.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    before = kernels.api.BACKEND_CALLS.copy()
    y = expert_mlp(x, w, None, w, None, c, activation="gelu")
    assert kernels.api.BACKEND_CALLS - before == {("expert_mlp", "reference"): 1}
    torch.testing.assert_close(y.double(), loop_mlp64(x, w, None, w, None, [4, 5], None, "gelu"),
                               rtol=1e-5, atol=1e-5)


def test_gpu_tests_bound_passes_bf16_rounding_and_catches_one_small_group():
    """tests/kernel_numerics.py, the per-group bound of tests/gpu, checked on CPU where it can
    run: the bf16 reference rounds where the CUDA kernels do (fp32-accumulated GEMM rounded
    once, + bias rounded once, one weight slab and one bias sum per expert) and passes at a
    ratio of ~1 to the emulated rounding error; a 7-row group 25% off, or the dW of a 7-row
    expert 25% off, fails it, while the whole-tensor bound (2e-2 relative) accepts both. The GPU tests' skewed shape: 2048 rows, one of 2020, three of 7, K=72, N=200."""
    import kernel_numerics as num

    gen = torch.Generator().manual_seed(7)
    experts, k, n, counts = 8, 72, 200, [0, 2020, 0, 7, 0, 7, 0, 7]
    x = rand(2053, k, gen=gen).bfloat16().requires_grad_()
    w = (rand(experts, k, n, gen=gen) * k ** -0.5).bfloat16().requires_grad_()
    b = rand(experts, n, gen=gen).bfloat16().requires_grad_()
    dy = rand(2053, n, gen=gen).bfloat16()
    y = grouped_gemm(x, w, torch.tensor(counts), bias=b, backend="reference")
    got = dict(zip(["y", "dx", "dw", "db"], [y, *torch.autograd.grad(y, [x, w, b], dy)]))
    bounds = num.group_bounds(counts, None)
    exact = num.grouped_gemm64(x, w, b, dy, bounds)
    emulated = num.grouped_gemm64(x, w, b, dy, bounds, round_to=torch.bfloat16)
    parts = {"y": num.row_parts(bounds), "dx": num.row_parts(bounds),
             "dw": num.expert_parts(experts), "db": num.expert_parts(experts)}
    for name, t in got.items():
        ratio = num.check_parts(name, t, exact[name], emulated[name], parts[name], torch.bfloat16)
        assert ratio < 1.05, (name, ratio)  # measured 1.000

    def whole(t, name):
        return float((t.double() - exact[name]).norm() / exact[name].norm())

    bad_y = got["y"].detach().clone()
    bad_y[2020:2027] *= 1.25                                       # group 3: rows 2020..2026
    bad_dw = got["dw"].detach().clone()
    bad_dw[3] *= 1.25                                              # expert 3 (7 rows)
    for name, bad in (("y", bad_y), ("dw", bad_dw)):
        assert whole(bad, name) < 2e-2, (name, whole(bad, name))   # the old bound passes it
        with pytest.raises(AssertionError, match="group 3|expert 3"):
            num.check_parts(name, bad, exact[name], emulated[name], parts[name], torch.bfloat16)


@pytest.mark.parametrize("kwargs,counts,error,match", [
    ({}, [1.0, 2.0], TypeError, "integer"),
    ({}, [1, 2, 3], ValueError, "multiple of 2 experts"),
    ({}, [4, -1], ValueError, "counts < 0"),
    ({}, [6, 5], ValueError, "sum to 11"),
    ({"stride": 4}, [5, 1], ValueError, "> stride 4"),
    ({"stride": 6}, [1, 1], ValueError, "12 rows"),
    ({"stride": 0}, [1, 1], ValueError, "positive int"),
    ({"backend": "triton"}, [1, 1], ValueError, "backend must be one of"),
])
def test_bad_arguments_name_the_values(kwargs, counts, error, match):
    x, w = torch.zeros(10, 4), torch.zeros(2, 4, 8)
    with pytest.raises(error, match=match):
        grouped_gemm(x, w, torch.tensor(counts), **kwargs)


def test_bad_shapes_and_activation():
    x, w = torch.zeros(10, 4), torch.zeros(2, 4, 8)
    c = torch.tensor([1, 1])
    with pytest.raises(ValueError, match=r"\[E, in, out\] with in = 4"):
        grouped_gemm(x, torch.zeros(2, 8, 4), c)
    with pytest.raises(ValueError, match=r"bias must be \[E, out\] = \[2, 8\]"):
        grouped_gemm(x, w, c, bias=torch.zeros(8))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        expert_mlp(x, w, None, torch.zeros(2, 8, 4), None, c, activation="relu")
    with pytest.raises(ValueError, match="w2 must be"):
        expert_mlp(x, w, None, torch.zeros(2, 4, 4), None, c)


def test_missing_extension_error_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(_ext.BUILD_DIR_ENV, str(tmp_path))  # an empty build directory
    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)
    _ext.load.cache_clear()
    try:
        assert not kernels.extension_available()
        x, w, c = torch.randn(6, 8), torch.randn(2, 8, 8), torch.tensor([2, 3])
        with pytest.raises(ExtensionNotBuiltError) as info:
            grouped_gemm(x, w, c, backend="cuda")
        message = str(info.value)
        assert "python -m kernels.build" in message and str(tmp_path) in message
        assert "backend='auto'" in message
        with pytest.raises(ExtensionNotBuiltError, match="python -m kernels.build"):
            expert_mlp(x, w, None, w, None, c, backend="cuda")
        assert "not available" in kernels.extension_status()
        grouped_gemm(x, w, c)  # auto falls back silently
    finally:
        _ext.load.cache_clear()


def test_import_kernels_never_loads_the_extension(tmp_path):
    code = ("import sys, kernels, torch\n"
            "assert 'upclip_kernels_C' not in sys.modules, 'extension imported eagerly'\n"
            "y = kernels.grouped_gemm(torch.ones(3, 8), torch.ones(1, 8, 8), torch.tensor([3]))\n"
            "assert float(y.sum()) == 3 * 8 * 8\n"
            "assert not kernels.extension_available()\n"
            "print(kernels.extension_status())\n")
    env = {**os.environ, _ext.BUILD_DIR_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not available" in out.stdout
