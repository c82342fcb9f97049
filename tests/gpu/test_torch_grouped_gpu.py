"""kernels' torch backend (torch's grouped mm) on a CUDA GPU: numerics, no host sync, auto.

Skipped without CUDA. Needs no extension (unlike test_grouped_gemm_gpu.py). bf16 only: the sync-
free kernel of torch's grouped mm is bf16 on compute capability 9.x/10.x; on other GPUs the
numerics tests still run (torch falls back to a loop) and the no-sync test is skipped.

Bound: tests/kernel_numerics.py per part (each row group of y and dx, each expert of dW and db,
within 1.5x the error of a float64 emulation of bf16 rounding + 0.05 u of the exact result on
the same inputs); the allocator is poisoned with NaN blocks first and padding rows hold NaN, so
a row torch leaves unwritten and we fail to mask shows up. Fresh random inputs (seed printed).
"""
from __future__ import annotations

import os

import pytest
import torch

import kernel_numerics as num
import kernels
from kernels import expert_mlp, torch_grouped

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SEED = int.from_bytes(os.urandom(4), "little")
BF16 = torch.bfloat16


def fast_path() -> bool:
    return torch.cuda.get_device_capability()[0] in (9, 10)


def inputs(layout: str, gen):
    m, h = 256, 1024
    if layout == "capacity":  # [ep, E_local, C, M], EP=2
        ep, experts, cap = 2, 4, 96
        counts = torch.randint(0, cap + 1, (ep, experts), device="cuda", generator=gen)
        counts[0, 1], counts[1, 2] = 0, cap
        stride, rows = cap, ep * experts * cap
        valid = (torch.arange(cap, device="cuda") < counts[..., None]).reshape(-1)
    else:  # skewed consecutive groups, empty experts, 5 rows past the last group
        experts, stride = 8, None
        c = [0, 2020, 0, 7, 0, 7, 0, 13]
        counts, rows = torch.tensor(c, device="cuda"), sum(c) + 5
        valid = torch.arange(rows, device="cuda") < sum(c)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(BF16)

    x = randn(rows, m).masked_fill(~valid[:, None], float("nan")).requires_grad_()
    params = [randn(experts, m, h, scale=m ** -0.5), randn(experts, h, scale=0.1),
              randn(experts, h, m, scale=h ** -0.5), randn(experts, m, scale=0.1)]
    return counts, stride, valid, x, [p.requires_grad_() for p in params], randn(rows, m)


@pytest.mark.parametrize("layout", ["capacity", "skewed"])
def test_torch_backend_within_bf16_bounds(layout):
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    counts, stride, valid, x, params, dy = inputs(layout, gen)
    blocks = [torch.full((x.shape[0], 1024), float("nan"), device="cuda", dtype=BF16)
              for _ in range(4)]
    del blocks
    y = expert_mlp(x, *params, counts, stride=stride, backend="torch")
    got = [y, *torch.autograd.grad(y, [x, *params], dy)]
    assert torch.all(y[~valid] == 0) and torch.all(got[1][~valid] == 0), f"seed {SEED}"
    bounds = num.group_bounds(counts.reshape(-1).tolist(), stride)
    clean = x.detach().masked_fill(~valid[:, None], 0.0)
    exact = num.expert_mlp64(clean, *params, dy, bounds, "gelu")
    emulated = num.expert_mlp64(clean, *params, dy, bounds, "gelu", round_to=BF16)
    for name, t in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], got):
        parts = num.row_parts(bounds) if name in ("y", "dx") else num.expert_parts(
            params[0].shape[0])
        num.check_parts(name, t, exact[name], emulated[name], parts, BF16, SEED)


@pytest.mark.skipif(CUDA and not fast_path(), reason="torch's grouped mm syncs off sm90/sm100")
def test_torch_backend_no_host_sync():
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    counts, stride, _, x, params, dy = inputs("capacity", gen)
    expert_mlp(x, *params, counts, stride=stride, backend="torch").backward(dy)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = expert_mlp(x, *params, counts, stride=stride, backend="torch")
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_auto_picks_a_grouped_backend_for_bf16():
    gen = torch.Generator(device="cuda").manual_seed(SEED)
    counts, stride, _, x, params, _ = inputs("skewed", gen)
    before = kernels.BACKEND_CALLS.copy()
    expert_mlp(x, *params, counts, stride=stride)
    got = dict(kernels.BACKEND_CALLS - before)
    assert len(got) == 1, got
    served = next(iter(got))[1]
    if fast_path():  # the extension when it is built and supports this GPU, else torch's
        assert served in ("cuda", "torch"), (got, torch_grouped.misfits(
            [x, *params], [256, 1024, 256], auto=True))
    else:
        assert served in ("cuda", "reference"), got
