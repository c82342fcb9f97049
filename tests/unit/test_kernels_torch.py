"""kernels' torch backend (torch's grouped_mm, kernels/torch_grouped.py) on CPU.

Numerics: bf16 outputs and every gradient (x, w1, b1, w2, b2) of the torch backend AND of the
reference are held to the per-part bound of tests/kernel_numerics.py (the GPU tests' bound):
against the exact float64 result on the same bf16 inputs, each row group of y and dx and each
expert of dW and db within 1.5x the error of a float64 emulation of 16-bit rounding, + 0.05 u
(u = 2^-8); a part whose exact value is zero (an expert with no rows) must be exactly zero. That
is ~2e-3-4e-3 relative per part here, near bf16's own error, so a group or an expert slab that
is 1% wrong fails however large the other groups are. Measured ratios to the emulated error
(printed with -s): torch backend 1.000-1.002 on every part (asserted < 1.3: it rounds where the
emulation does; with G > E groups its per-expert gradients are one GEMM over all sources, one
rounding fewer than the emulated per-group slabs). The reference: 1.0 everywhere except the bias
gradients with G > E groups (1.15-1.76): it rounds each group's bias-gradient sum to bf16 and
adds the ep sums in bf16, one rounding more than the model; it is held to 2.5x there, 1.5x
elsewhere. Both within their bounds of the exact result puts them within ~2 bf16 roundings of
each other on every part. fp32 (explicit backend="torch") compares to a
float64 loop at rtol=atol=1e-5 (outputs) and 1e-4 (gradients), as test_kernels_reference.py.
Rows in no group hold NaN: outputs and gradients there must be exactly 0 and nothing else may
turn NaN.
"""
from __future__ import annotations

import pytest
import torch
import kernel_numerics as num
import kernels
from host_reads import HostReads
from kernels import expert_mlp, grouped_gemm, torch_grouped

BF16 = torch.bfloat16
RATIO_MAX = 1.3  # measured: see the docstring

# name -> (counts, experts E, stride, extra uncovered rows after the last group / G*C)
LAYOUTS = {
    # G == E, consecutive: torch's offsets straight from the counts (no permutation)
    "skewed_empty": ([0, 2020, 0, 7, 0, 7, 0, 7], 8, None, 5),
    # dropless at EP=2: groups (src, e), G = 2E consecutive, merged per expert
    "dropless_ep2": ([[5, 0, 40, 3], [0, 17, 9, 1]], 4, None, 6),
    # DeepSpeed capacity layout [ep, E_local, C, M]: padding after each group's rows
    "capacity_ep2": ([[24, 0, 11, 3], [1, 24, 0, 17]], 4, 24, 0),
    "capacity_ep1": ([[9, 0, 24, 2]], 4, 24, 3),
    "all_empty": ([0, 0, 0, 0], 4, None, 7),
}


def rows_of(counts, stride, extra):
    flat = torch.tensor(counts).reshape(-1).tolist()
    used = len(flat) * stride if stride else sum(flat)
    return flat, used + extra


def covered_mask(flat, stride, rows):
    mask = torch.zeros(rows, dtype=torch.bool)
    for start, n in num.group_bounds(flat, stride):
        mask[start:start + n] = True
    return mask


def make_inputs(layout, m, h, dtype, seed):
    counts, experts, stride, extra = LAYOUTS[layout]
    flat, rows = rows_of(counts, stride, extra)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    covered = covered_mask(flat, stride, rows)
    x = randn(rows, m).masked_fill(~covered[:, None], float("nan")).requires_grad_()
    params = [randn(experts, m, h, scale=m ** -0.5), randn(experts, h, scale=0.1),
              randn(experts, h, m, scale=h ** -0.5), randn(experts, m, scale=0.1)]
    params = [p.requires_grad_() for p in params]
    dy = randn(rows, m)
    return torch.tensor(counts), flat, stride, covered, x, params, dy


def run_mlp(backend, counts, stride, x, params, dy, activation="gelu"):
    y = expert_mlp(x, *params, counts, stride=stride, activation=activation, backend=backend)
    return [y, *torch.autograd.grad(y, [x, *params], dy)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_and_reference_within_bf16_bounds_of_float64(layout):
    """Both backends against the exact float64 result, per group / per expert."""
    counts, flat, stride, covered, x, params, dy = make_inputs(layout, 72, 64, BF16, seed=11)
    bounds = num.group_bounds(flat, stride)
    clean = x.detach().masked_fill(~covered[:, None], 0.0)  # the references read rows in groups
    exact = num.expert_mlp64(clean, *params, dy, bounds, "gelu")
    emulated = num.expert_mlp64(clean, *params, dy, bounds, "gelu", round_to=BF16)
    names = ["y", "dx", "dw1", "db1", "dw2", "db2"]
    parts = {n: num.row_parts(bounds) if n in ("y", "dx") else num.expert_parts(params[0].shape[0])
             for n in names}
    merged = len(flat) > params[0].shape[0]  # G > E: ep sources per expert
    for backend in ("torch", "reference"):
        got = run_mlp(backend, counts, stride, x, params, dy)
        assert torch.all(got[0][~covered] == 0), f"{backend}: rows in no group must be 0"
        assert torch.all(got[1][~covered] == 0), f"{backend}: rows in no group get 0 grad"
        if backend == "torch":
            worst = {n: num.check_parts(f"torch {n}", t, exact[n], emulated[n], parts[n], BF16)
                     for n, t in zip(names, got)}
            assert max(worst.values()) < RATIO_MAX, worst
        else:
            worst = {n: reference_ratio(n, t, exact[n], emulated[n], parts[n],
                                        2.5 if merged and n in ("db1", "db2") else num.RATIO)
                     for n, t in zip(names, got)}
        print(layout, backend, {n: round(r, 3) for n, r in worst.items()})


def reference_ratio(name, got, exact, emulated, parts, ratio):
    """kernel_numerics' per-part bound with the reference's own ratio; worst ratio."""
    u, worst = num.UNIT_ROUNDOFF[BF16], 0.0
    assert torch.isfinite(got).all(), name
    for label, norm, err, emu in num.part_errors(got, exact, emulated, parts):
        if norm == 0.0:
            assert err == 0.0, f"reference {name} {label}: must be exactly zero"
            continue
        assert err <= ratio * emu + num.FLOOR * u, (name, label, err, emu)
        worst = max(worst, err / max(emu, 1e-30))
    return worst


@pytest.mark.parametrize("layout", ["dropless_ep2", "capacity_ep2"])
def test_grouped_gemm_torch_within_bf16_bounds(layout):
    counts, experts, stride, extra = LAYOUTS[layout]
    flat, rows = rows_of(counts, stride, extra)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(rows, 48, generator=gen).to(BF16).requires_grad_()
    w = (torch.randn(experts, 48, 40, generator=gen) * 48 ** -0.5).to(BF16).requires_grad_()
    b = torch.randn(experts, 40, generator=gen).to(BF16).requires_grad_()
    dy = torch.randn(rows, 40, generator=gen).to(BF16)
    y = grouped_gemm(x, w, torch.tensor(counts), bias=b, stride=stride, backend="torch")
    got = dict(zip(["y", "dx", "dw", "db"], [y, *torch.autograd.grad(y, [x, w, b], dy)]))
    bounds = num.group_bounds(flat, stride)
    exact = num.grouped_gemm64(x, w, b, dy, bounds)
    emulated = num.grouped_gemm64(x, w, b, dy, bounds, round_to=BF16)
    for name, t in got.items():
        parts = num.row_parts(bounds) if name in ("y", "dx") else num.expert_parts(experts)
        assert num.check_parts(name, t, exact[name], emulated[name], parts, BF16) < RATIO_MAX


@pytest.mark.parametrize("layout", ["skewed_empty", "dropless_ep2", "capacity_ep2"])
@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_torch_float32_matches_float64_loop(layout, activation):
    """fp32 runs on torch's grouped mm too (explicit backend): empty groups included."""
    counts, flat, stride, covered, x, params, dy = make_inputs(layout, 24, 16, torch.float32, 13)
    got = run_mlp("torch", counts, stride, x, params, dy, activation)
    inputs64 = [t.detach().double().masked_fill(t.detach().isnan(), 0.0).requires_grad_()
                for t in [x, *params]]
    rows = [slice(s, s + n) for s, n in num.group_bounds(flat, stride)]
    y64 = torch.zeros_like(inputs64[0])
    act = {"gelu": torch.nn.functional.gelu, "quick_gelu": kernels.activations.quick_gelu}[
        activation]
    w1, b1, w2, b2 = inputs64[1:]
    for g, sl in enumerate(rows):
        e = g % w1.shape[0]
        y64[sl] = act(inputs64[0][sl] @ w1[e] + b1[e]) @ w2[e] + b2[e]
    want = [y64, *torch.autograd.grad(y64, inputs64, dy.double(), allow_unused=True)]
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w if w is not None else torch.zeros_like(g,
                                   dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_expanded_output_gradient(dtype):
    """``y.sum().backward()`` hands an expanded (stride-0) gradient: torch's grouped mm raises
    "Invalid strides/sizes" on one (the error once blamed on fp32 + an empty group); the
    backend feeds it materialised gradients, so this runs, empty groups included."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(10, 16, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(3, 16, 8, generator=gen).to(dtype).requires_grad_()
    grouped_gemm(x, w, torch.tensor([4, 0, 4]), backend="torch").sum().backward()
    assert torch.all(w.grad[1] == 0) and torch.all(x.grad[8:] == 0)
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def served(call) -> dict:
    before = kernels.api.BACKEND_CALLS.copy()
    call()
    return dict(kernels.api.BACKEND_CALLS - before)


def test_auto_on_cpu_picks_torch_for_16_bit_and_the_reference_for_fp32():
    c = torch.tensor([3, 0, 5, 0])
    for dtype, want in [(BF16, "torch"), (torch.float16, "torch"), (torch.float32, "reference")]:
        x, w = torch.randn(9, 16).to(dtype), torch.randn(4, 16, 16).to(dtype)
        assert served(lambda: grouped_gemm(x, w, c)) == {("grouped_gemm", want): 1}, dtype
        assert served(lambda: expert_mlp(x, w, None, w, None, c)) == {("expert_mlp", want): 1}
    # feature sizes that are not 16-byte multiples, or mixed dtypes: the reference
    x, w = torch.randn(9, 12).to(BF16), torch.randn(4, 12, 16).to(BF16)
    assert served(lambda: grouped_gemm(x, w, c)) == {("grouped_gemm", "reference"): 1}
    assert torch_grouped.misfits([x, w.float()], [12, 16], auto=True)  # mixed dtypes


def test_explicit_torch_backend_names_what_does_not_fit():
    c = torch.tensor([1, 1])
    with pytest.raises(ValueError, match=r"backend='torch'.*multiples of 8"):
        grouped_gemm(torch.zeros(4, 12, dtype=BF16), torch.zeros(2, 12, 16, dtype=BF16), c,
                     backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch'.*mixed dtypes"):
        grouped_gemm(torch.zeros(4, 16, dtype=BF16), torch.zeros(2, 16, 16), c, backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch'.*dtype torch.float64"):
        grouped_gemm(torch.zeros(4, 16, dtype=torch.float64),
                     torch.zeros(2, 16, 16, dtype=torch.float64), c, backend="torch")


@pytest.mark.parametrize("layout", ["skewed_empty", "dropless_ep2", "capacity_ep2"])
def test_torch_backend_reads_nothing_on_the_host(layout):
    counts, flat, stride, covered, x, params, dy = make_inputs(layout, 16, 16, BF16, seed=15)
    reads = {}
    for backend in ("torch", "reference"):
        with HostReads() as r:
            run_mlp(backend, counts, stride, x, params, dy)
        reads[backend] = r.by_kind
    assert reads["torch"] == {}, reads
    assert reads["reference"].get("Tensor.tolist"), reads  # the counter sees its tolist()


def test_plan_sorts_rows_by_expert_and_counts_them():
    """The capacity layout at EP=2: rows of expert e from both sources, in order, then the
    padding; offsets per expert; the one-hot names each sorted row's expert."""
    counts = torch.tensor([[2, 0], [1, 3]])  # groups (src, e): g = src * 2 + e, C = 3
    p = torch_grouped.plan(counts.reshape(-1), 12, 2, 3, torch.zeros(1))
    # rows: g0 -> 0, 1; g1 -> none; g2 -> 6; g3 -> 9, 10, 11; padding: 2..5, 7, 8
    assert p.perm.tolist() == [0, 1, 6, 9, 10, 11, 2, 3, 4, 5, 7, 8]
    assert p.offs.tolist() == [3, 6] and p.offs.dtype == torch.int32
    assert p.inside[:, 0].tolist() == [True] * 6 + [False] * 6
    assert p.onehot.argmax(1)[:6].tolist() == [0, 0, 0, 1, 1, 1]
    assert p.onehot[6:].sum() == 0
    assert torch.equal(p.perm[p.inv], torch.arange(12))
