"""torch's own grouped GEMM (``torch.nn.functional.grouped_mm``, ``torch._grouped_mm`` before
torch 2.10) as an expert backend: no host sync, autograd through torch's grouped_mm backward.

torch's grouped_mm multiplies consecutive row groups of x [T, K] by w [G, K, N]: group i is
rows [offs[i-1], offs[i]) with int32 ``offs``; it has no bias and leaves rows past offs[-1]
unwritten, in its output and in the dx of its backward (uninitialised memory, NaN possible).
Our layouts (kernels/layout.py) map onto it with device-side index arithmetic only:

1. Row plan (``plan``): each row's group from the counts, on the device (consecutive: a
   ``searchsorted`` over the clamped cumulative counts; strided: ``row // C`` and
   ``row % C < counts[g]``). Rows in no group (capacity padding, rows past the last group) get
   expert E. A stable sort of the rows by expert (``argsort`` on the device, no host read)
   puts each expert's rows together, in source order, the rows in no group last. Torch sees E
   groups (one per expert, sources g = src * E + e merged: no weight is repeated) with
   ``offs = cumsum(rows per expert)`` and the padding never enters a GEMM (no wasted FLOPs
   on capacity padding). Consecutive groups with G == E are already sorted: no permutation.
2. Padding rows: ``torch.where(inside, ., 0)`` on the sorted rows before fc1, after fc1 + b1
   and after fc2 + b2. A select, not a product: torch's garbage rows (possibly NaN) are dropped
   in the forward and their gradients in the backward (0 * NaN would be NaN), so padding rows
   come out exactly 0 and get exactly 0 gradient, as in the reference.
3. Biases: ``onehot [T, E] @ b`` (the expert of each sorted row; all-zero for rows in no
   group), added to the GEMM output: exact in the forward (one term), and the bias gradient is
   ``onehot^T @ dy``, one GEMM accumulated in fp32 and rounded once (an ``index_add`` would
   accumulate in bf16, and on CUDA with atomics). It costs T*E*N FLOPs, E/K of the GEMM's.
4. Counts are not validated (that needs a host read): like the CUDA extension, negative counts
   read as 0, consecutive groups are clipped at T rows, strided ones at C.

What torch's grouped_mm accepts (torch 2.10-2.14, aten/src/ATen/native/GroupedMMUtils.h,
measured on CPU with torch 2.14.1): bf16, fp16 and fp32 of one dtype; every matrix row- or
column-major with its leading stride a multiple of 16 bytes (K, N multiples of 8 in bf16/fp16,
4 in fp32) and, on CUDA, data pointers 16-byte aligned; int32 offsets; no grad_output with a
zero stride (``y.sum().backward()`` hands it an expanded one and it raises "Invalid
strides/sizes": that, not fp32 or an empty group, is the error measured on CPU; our ``where``
always hands it a materialised gradient, so fp32 and empty groups work). On CUDA only bf16 on
compute capability 9.x/10.x runs its CUTLASS kernel; anything else falls back to a per-group
loop that copies ``offs`` to the host (one sync per call): ``auto`` does not pick it there.
On CPU, ``auto`` picks it for bf16/fp16 and leaves fp32 on the reference (measured on 2 shared
cores, d=256, ffn=1024, E=4: the torch backend took 1.04-1.19x the reference's time in fp32,
from its extra selects, one-hot GEMMs and row gathers; both are per-group mm loops on CPU).
Group sizes need no alignment in bf16 (torchtitan's token-group alignment is 1 for bf16).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from kernels.activations import activation_fn

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ALIGN_BYTES = 16


@functools.cache
def entry_point() -> tuple[str, Callable | None]:
    """(name, function) of torch's grouped mm: ``F.grouped_mm`` (torch >= 2.10), else
    ``torch._grouped_mm`` (2.8, 2.9), else (name, None)."""
    fn = getattr(F, "grouped_mm", None)
    if fn is not None:
        return "torch.nn.functional.grouped_mm", fn
    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        return "torch._grouped_mm", lambda a, b, offs: fn(a, b, offs=offs)
    return "grouped_mm", None


def misfits(tensors: list[torch.Tensor | None], dims: list[int], auto: bool) -> list[str]:
    """Why torch's grouped mm cannot run this call (empty: it can). ``auto`` adds where it is
    the better choice: on CUDA its sync-free kernel (bf16, compute capability 9.x or 10.x),
    on CPU bf16 and fp16 (fp32 stays on the reference there)."""
    name, fn = entry_point()
    if fn is None:
        return [f"torch {torch.__version__} has no grouped mm (F.grouped_mm / torch._grouped_mm)"]
    present = [t for t in tensors if t is not None]
    x = present[0]
    if len({t.device for t in present}) > 1:
        return ["all tensors must be on one device"]
    dtypes = {t.dtype for t in present}
    if len(dtypes) > 1:
        return [f"mixed dtypes {sorted(str(d) for d in dtypes)}"]
    why = []
    if x.dtype not in DTYPES:
        why.append(f"dtype {x.dtype} (torch's grouped mm takes bf16, fp16, fp32)")
        return why
    per = _ALIGN_BYTES // x.element_size()
    if any(d % per for d in dims):
        why.append(f"feature sizes {dims} must be multiples of {per} ({_ALIGN_BYTES} bytes in "
                   f"{x.dtype})")
    if auto and x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        if x.dtype != torch.bfloat16 or major not in (9, 10):
            why.append(f"{x.dtype} on compute capability {major}.{minor}: torch's grouped mm "
                       "runs a per-group loop there with a host read of the offsets (its "
                       "sync-free kernel is bf16 on 9.x/10.x)")
    elif auto and x.dtype == torch.float32:
        why.append("float32 on CPU: the reference is as exact and faster there (see "
                   "kernels/README.md)")
    return why


class Plan(NamedTuple):
    """The rows of one call in expert order, all on x's device."""
    perm: torch.Tensor | None    # [T] sorted row -> original row (None: already sorted)
    inv: torch.Tensor | None     # [T] original row -> sorted row
    inside: torch.Tensor         # [T, 1] bool, sorted rows: the row is in a group
    onehot: torch.Tensor         # [T, E] x.dtype, sorted rows: the row's expert (0s outside)
    offs: torch.Tensor           # [E] int32: end row of each expert's rows
    nonempty: torch.Tensor       # [E] bool: the expert has rows


def plan(counts: torch.Tensor, total_rows: int, num_experts: int, stride: int | None,
         like: torch.Tensor) -> Plan:
    """The row plan of the module docstring for ``counts [G]`` (G % E == 0), on ``like``'s
    device, in ``like``'s dtype for the one-hot. Device ops only: no host read."""
    device, t, e = like.device, total_rows, num_experts
    counts = counts.to(device=device, dtype=torch.int64).clamp_min(0)
    groups = counts.numel()
    rows = torch.arange(t, device=device)
    if stride is None:
        ends = counts.cumsum(0).clamp_max(t)
        sizes = torch.diff(ends, prepend=ends.new_zeros(1))
        gid = torch.searchsorted(ends, rows, right=True)              # G: past the last group
    else:
        sizes = counts.clamp_max(stride)
        g = rows // stride
        inside = (g < groups) & (rows % stride < sizes[g.clamp_max(groups - 1)])
        gid = torch.where(inside, g, groups)
    inside = gid < groups
    expert = torch.where(inside, gid % e, e)                          # e: in no group
    per_expert = sizes.view(-1, e).sum(0)
    offs = per_expert.cumsum(0).to(torch.int32)
    perm = inv = None
    if stride is not None or groups != e:
        perm = torch.argsort(expert, stable=True)
        inv = torch.empty_like(perm).scatter_(0, perm, rows)
        expert, inside = expert.index_select(0, perm), inside.index_select(0, perm)
    onehot = (expert[:, None] == torch.arange(e, device=device)).to(like.dtype)
    return Plan(perm, inv, inside[:, None], onehot, offs, per_expert > 0)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned data pointer (CUDA's requirement)."""
    t = t.contiguous()
    if t.data_ptr() % _ALIGN_BYTES:
        t = t.clone()
    return t


def _weights(w: torch.Tensor, p: Plan) -> torch.Tensor:
    w = _operand(w)
    if w.is_cuda and torch.cuda.get_device_capability(w.device)[0] >= 10:
        # pytorch/pytorch#172439: on Blackwell the weight gradient of an empty group is not
        # zero; the select keeps those experts' gradient at exactly 0
        w = torch.where(p.nonempty[:, None, None], w, w.detach())
    return w


def _linear(xs: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: Plan) -> torch.Tensor:
    """Sorted rows -> fc(xs) (+ bias), rows in no group exactly 0 (forward and gradient)."""
    _, gmm = entry_point()
    y = gmm(xs, _weights(w, p), offs=p.offs)
    if b is not None:
        y = y + p.onehot @ b
    return torch.where(p.inside, y, 0)


def _sorted_input(x2d: torch.Tensor, p: Plan) -> torch.Tensor:
    xs = x2d if p.perm is None else x2d.index_select(0, p.perm)
    # drops the rows in no group, and in the backward torch's unwritten dx rows of them
    return _operand(torch.where(p.inside, xs, 0))


def _unsorted(ys: torch.Tensor, p: Plan) -> torch.Tensor:
    return ys if p.inv is None else ys.index_select(0, p.inv)


def grouped_gemm(x2d: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 counts: torch.Tensor, stride: int | None) -> torch.Tensor:
    """kernels.grouped_gemm on torch's grouped mm (arguments already checked)."""
    p = plan(counts, x2d.shape[0], w.shape[0], stride, x2d)
    return _unsorted(_linear(_sorted_input(x2d, p), w, bias, p), p)


def expert_mlp(x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, counts: torch.Tensor, stride: int | None,
               activation: str) -> torch.Tensor:
    """kernels.expert_mlp on torch's grouped mm: the rows sorted once for both layers."""
    p = plan(counts, x2d.shape[0], w1.shape[0], stride, x2d)
    h = _linear(_sorted_input(x2d, p), w1, b1, p)
    a = _operand(activation_fn(activation)(h))  # act(0) == 0: rows in no group stay 0
    return _unsorted(_linear(a, w2, b2, p), p)
