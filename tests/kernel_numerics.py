"""Float64 references for the grouped GEMM / expert MLP kernels, exact and with their roundings.

Both references take the kernels' 16-bit inputs and compute in float64 on their exact values,
group by group (group g: rows [start, start + rows), expert g % E), forward and backward:
  exact     (round_to=None): no rounding anywhere, the result the kernels approximate;
  emulated  (round_to=dtype): rounded to the 16-bit dtype wherever kernels/csrc stores a 16-bit
            value: every GEMM output (fp32 accumulate, epilogue D = rn(acc)), h + bias,
            act(h), da * act'(h), each group's weight-gradient slab, the per-expert fp32 sum of
            those slabs and of the bias-gradient row sums (kernels/_cuda.py, elementwise.cu).
The emulated result's error against the exact one is the error a correct kernel makes on this
very data and these shapes. ``check_parts`` bounds a kernel's error per part (each row group of
y and dx, each expert of dw and db), relative to that part's norm:

    |got - exact|_F <= (1.5 * |emulated - exact|_F + 0.05 * u * |exact|_F)      per part

with u the unit roundoff (2^-8 bf16, 2^-11 fp16). A correct kernel differs from the emulation
only where fp32 accumulation order moves a value across a rounding boundary (a few elements, one
unit in the last place), so its ratio is ~1.0. One rounding more than modelled gives ~1.41
(still passes: the model may miss one), truncation instead of round-to-nearest ~2, a group 1%
wrong ~5 or more. A part whose exact value is all zero (an expert that got no rows) must be
exactly zero.
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
RATIO, FLOOR = 1.5, 0.05  # the bound above: RATIO x emulated error + FLOOR x u


def group_bounds(counts: list[int], stride: int | None) -> list[tuple[int, int]]:
    """[(start, rows)] per group: consecutive from row 0, or group g at row g * stride."""
    if stride is not None:
        return [(g * stride, c) for g, c in enumerate(counts)]
    starts = [sum(counts[:g]) for g in range(len(counts))]
    return list(zip(starts, counts))


def _rounder(round_to: torch.dtype | None):
    if round_to is None:
        return lambda t: t
    return lambda t: t.to(round_to).to(torch.float64)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_grad(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(
        2.0 * math.pi)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _quick_gelu_grad(x):
    s = torch.sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


ACTIVATIONS = {"gelu": (_gelu, _gelu_grad), "quick_gelu": (_quick_gelu, _quick_gelu_grad)}


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _per_expert(slabs: list[tuple[int, torch.Tensor]], like: torch.Tensor, r) -> torch.Tensor:
    """Sum each expert's per-group slabs (float64 here, fp32 in kernels/_cuda.py), one rounding."""
    out = torch.zeros_like(like)
    for e, slab in slabs:
        out[e] += slab
    return r(out)


def grouped_gemm64(x, w, bias, dy, bounds, round_to=None) -> dict[str, torch.Tensor]:
    """y = x @ w[e] (+ bias[e]) per group and its gradients for the output gradient dy.
    x [T, K], w [E, K, N], bias [E, N] or None, dy [T, N] -> {"y", "dx", "dw", "db"} float64
    (db None without bias); rows in no group are zero in y and dx."""
    r = _rounder(round_to)
    x, w, bias, dy = _f64(x), _f64(w), _f64(bias), _f64(dy)
    experts = w.shape[0]
    y = x.new_zeros(x.shape[0], w.shape[2])
    dx = torch.zeros_like(x)
    dw, db = [], []
    for g, (start, rows) in enumerate(bounds):
        e, sl = g % experts, slice(start, start + rows)
        acc = r(x[sl] @ w[e])                                  # GEMM epilogue: D = rn(acc)
        y[sl] = r(acc + bias[e]) if bias is not None else acc  # elementwise bias pass
        dx[sl] = r(dy[sl] @ w[e].t())
        dw.append((e, r(x[sl].t() @ dy[sl])))                  # one 16-bit slab per group
        db.append((e, dy[sl].sum(0)))                          # fp32 row sums
    return {"y": y, "dx": dx, "dw": _per_expert(dw, w, r),
            "db": _per_expert(db, bias, r) if bias is not None else None}


def expert_mlp64(x, w1, b1, w2, b2, dy, bounds, activation, round_to=None) -> dict:
    """fc2(act(fc1(x))) per group and its gradients: {"y", "dx", "dw1", "db1", "dw2", "db2"}
    float64 (bias gradients None without bias). x [T, M], w1 [E, M, H], w2 [E, H, M_out]."""
    r = _rounder(round_to)
    act, act_grad = ACTIVATIONS[activation]
    x, w1, b1, w2, b2, dy = map(_f64, (x, w1, b1, w2, b2, dy))
    experts = w1.shape[0]
    y = x.new_zeros(x.shape[0], w2.shape[2])
    dx = torch.zeros_like(x)
    dw1, db1, dw2, db2 = [], [], [], []
    for g, (start, rows) in enumerate(bounds):
        e, sl = g % experts, slice(start, start + rows)
        h = r(x[sl] @ w1[e])
        if b1 is not None:
            h = r(h + b1[e])                                   # saved for backward (16-bit)
        a = r(act(h))
        out = r(a @ w2[e])
        y[sl] = r(out + b2[e]) if b2 is not None else out
        da = r(dy[sl] @ w2[e].t())
        dh = r(da * act_grad(h))
        dw2.append((e, r(a.t() @ dy[sl])))
        db2.append((e, dy[sl].sum(0)))
        dw1.append((e, r(x[sl].t() @ dh)))
        db1.append((e, dh.sum(0)))
        dx[sl] = r(dh @ w1[e].t())
    return {"y": y, "dx": dx, "dw1": _per_expert(dw1, w1, r),
            "db1": _per_expert(db1, b1, r) if b1 is not None else None,
            "dw2": _per_expert(dw2, w2, r),
            "db2": _per_expert(db2, b2, r) if b2 is not None else None}


def row_parts(bounds) -> list[tuple[str, slice]]:
    """One part per non-empty row group."""
    return [(f"group {g} ({rows} rows)", slice(start, start + rows))
            for g, (start, rows) in enumerate(bounds) if rows]


def expert_parts(experts: int) -> list[tuple[str, int]]:
    return [(f"expert {e}", e) for e in range(experts)]


def part_errors(got, exact, emulated, parts) -> list[tuple[str, float, float, float]]:
    """[(label, |exact|_F, relative error of got, relative error of emulated)] per part."""
    got = got.detach().to(torch.float64).reshape(exact.shape)
    out = []
    for label, index in parts:
        ref = exact[index]
        norm = float(ref.norm())
        scale = norm if norm > 0 else 1.0
        out.append((label, norm, float((got[index] - ref).norm()) / scale,
                    float((emulated[index] - ref).norm()) / scale))
    return out


def check_parts(what: str, got, exact, emulated, parts, dtype, seed=None) -> float:
    """Assert the per-part bound of this module's docstring; returns the worst ratio
    (error / emulated error) over the parts, for reporting."""
    u = UNIT_ROUNDOFF[dtype]
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    worst = 0.0
    bad = []
    for label, norm, err, emu in part_errors(got, exact, emulated, parts):
        if norm == 0.0:
            if err != 0.0:
                bad.append(f"{label}: must be exactly zero, |got| = {err:.3e}")
            continue
        # the emulation itself must look like 16-bit rounding (a loose bound would hide bugs)
        assert emu <= 4 * u, f"{what} {label}: emulated error {emu:.2e} > 4u: pathological data"
        bound = RATIO * emu + FLOOR * u
        worst = max(worst, err / max(emu, 1e-30))
        if err > bound:
            bad.append(f"{label}: relative error {err:.3e} > {bound:.3e} (emulated 16-bit "
                       f"rounding gives {emu:.3e}, ratio {err / max(emu, 1e-30):.2f})")
    assert not bad, f"{what} ({dtype}, seed {seed}):\n  " + "\n  ".join(bad)
    return worst
