"""Public API: grouped_gemm and expert_mlp, with backend dispatch.

backend="auto"       the CUDA extension when it is built and the call fits it (CUDA tensors,
                     all bf16 or all fp16, feature sizes multiples of 8, a supported GPU);
                     else torch's grouped mm when it runs the call without a host sync
                     (kernels/torch_grouped.py: CPU bf16/fp16, CUDA bf16 on compute
                     capability 9.x/10.x, one dtype, feature sizes 16-byte multiples); else
                     the PyTorch reference. Never raises for a missing extension.
backend="cuda"       the extension or an error: ExtensionNotBuiltError (how to build it) when
                     it is missing, ValueError (what does not fit) otherwise.
backend="torch"      torch's grouped mm or a ValueError saying what does not fit; it also runs
                     fp32, and on CUDA where torch itself loops with a host read.
backend="reference"  the PyTorch reference (kernels/reference.py).

BACKEND_CALLS counts the calls each backend served, by (function, backend), e.g.
("expert_mlp", "torch"): what "auto" chose is visible to tests, logs, metrics and benchmarks.
It counts Python calls (one dict update each), not CUDA-graph replays.
"""
from __future__ import annotations

from collections import Counter

import torch

from kernels import _ext, reference, torch_grouped
from kernels.activations import activation_id
from kernels.layout import check_counts, host_bounds

BACKENDS = ("auto", "cuda", "torch", "reference")
SERVED_BY = ("cuda", "torch", "reference")  # what a call can be served by
_CUDA_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MAX_GROUPS = 4096  # csrc/elementwise.cu keeps every group's bounds in shared memory
# calls served: ("grouped_gemm" | "expert_mlp", "cuda" | "torch" | "reference") -> count
BACKEND_CALLS: Counter = Counter()


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *,
                 bias: torch.Tensor | None = None, stride: int | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Per row group g: y[rows_g] = x[rows_g] @ w[g % E] (+ bias[g % E]); other rows -> 0.

    x: [..., K] (leading dims flattened to T rows); w: [E, K, N] (nn.Linear weight transposed);
    bias: [E, N] or None; counts: integer [G] (any shape, flattened; G % E == 0), best on x's
    device; stride: None (consecutive groups) or C (group g starts at row g*C), see layout.py.
    Returns [..., N] in x's dtype. Differentiable in x, w and bias.
    """
    x2d, lead = _rows(x)
    _check_weight(x2d, w, "w")
    _check_bias(bias, w, "bias")
    counts = check_counts(counts, x2d.shape[0], w.shape[0], stride)
    served = select_backend(backend, [x2d, w, bias], [w.shape[1], w.shape[2]], counts.numel())
    if served == "cuda":
        from kernels import _cuda

        layout = _cuda.group_layout(counts, x2d, stride)
        y = _cuda.GroupedGemm.apply(x2d.contiguous(), w.contiguous(), _contiguous(bias), layout)
    elif served == "torch":
        y = torch_grouped.grouped_gemm(x2d, w, bias, counts, stride)
    else:
        bounds = host_bounds(counts, x2d.shape[0], stride)
        y = reference.grouped_gemm_reference(x2d, w, bounds, bias)
    BACKEND_CALLS["grouped_gemm", served] += 1
    return y.reshape(*lead, w.shape[2])


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, counts: torch.Tensor, *, stride: int | None = None,
               activation: str = "gelu", backend: str = "auto") -> torch.Tensor:
    """Per row group g: fc2(act(fc1(x))) with expert e = g % E; rows in no group -> 0.

    x: [..., M]; w1: [E, M, H]; b1: [E, H]; w2: [E, H, M_out]; b2: [E, M_out] (biases may be
    None); activation: "gelu" (exact erf) or "quick_gelu". counts/stride as in grouped_gemm.
    Returns [..., M_out]. Differentiable in x, w1, b1, w2, b2.
    """
    act = activation_id(activation)  # validates the name
    x2d, lead = _rows(x)
    _check_weight(x2d, w1, "w1")
    if w2.dim() != 3 or w2.shape[0] != w1.shape[0] or w2.shape[1] != w1.shape[2]:
        raise ValueError(f"kernels: w2 must be [E, H, M_out] = [{w1.shape[0]}, {w1.shape[2]}, *] "
                         f"to follow w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
    _check_bias(b1, w1, "b1")
    _check_bias(b2, w2, "b2")
    counts = check_counts(counts, x2d.shape[0], w1.shape[0], stride)
    dims = [w1.shape[1], w1.shape[2], w2.shape[2]]
    served = select_backend(backend, [x2d, w1, b1, w2, b2], dims, counts.numel())
    if served == "cuda":
        from kernels import _cuda

        layout = _cuda.group_layout(counts, x2d, stride)
        y = _cuda.ExpertMLP.apply(x2d.contiguous(), w1.contiguous(), _contiguous(b1),
                                  w2.contiguous(), _contiguous(b2), layout, act)
    elif served == "torch":
        y = torch_grouped.expert_mlp(x2d, w1, b1, w2, b2, counts, stride, activation)
    else:
        bounds = host_bounds(counts, x2d.shape[0], stride)
        y = reference.expert_mlp_reference(x2d, w1, b1, w2, b2, bounds, activation)
    BACKEND_CALLS["expert_mlp", served] += 1
    return y.reshape(*lead, w2.shape[2])


# ---- checks and dispatch -------------------------------------------------------------------

def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.dim() < 2:
        raise ValueError(f"kernels: x must be [..., features] with at least 2 dims, got "
                         f"{tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _check_weight(x2d: torch.Tensor, w: torch.Tensor, name: str) -> None:
    if w.dim() != 3 or w.shape[1] != x2d.shape[1]:
        raise ValueError(f"kernels: {name} must be [E, in, out] with in = {x2d.shape[1]} "
                         f"(x's last dim), got {tuple(w.shape)}")


def _check_bias(bias: torch.Tensor | None, w: torch.Tensor, name: str) -> None:
    if bias is not None and tuple(bias.shape) != (w.shape[0], w.shape[2]):
        raise ValueError(f"kernels: {name} must be [E, out] = [{w.shape[0]}, {w.shape[2]}], got "
                         f"{tuple(bias.shape)}")


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _cuda_misfits(tensors: list[torch.Tensor | None], dims: list[int], groups: int,
                  module) -> list[str]:
    """Why this call cannot run on the extension (empty list: it can)."""
    present = [t for t in tensors if t is not None]
    x = present[0]
    if not all(t.is_cuda for t in present):
        return ["all tensors must be CUDA tensors"]
    if len({t.device for t in present}) > 1:
        return ["all tensors must be on one device"]
    why = []
    dtypes = {t.dtype for t in present}
    built = set(module.build_info()["dtypes"])
    if len(dtypes) > 1:
        why.append(f"mixed dtypes {sorted(str(d) for d in dtypes)}")
    elif x.dtype not in _CUDA_DTYPES or _CUDA_DTYPES[x.dtype] not in built:
        why.append(f"dtype {x.dtype} (this build has {sorted(built)})")
    if any(d % 8 for d in dims):
        why.append(f"feature sizes {dims} must be multiples of 8")
    if groups > _MAX_GROUPS:
        why.append(f"{groups} groups > {_MAX_GROUPS}")
    if not module.supports_device(x.device.index if x.device.index is not None else
                                  torch.cuda.current_device()):
        major, minor = torch.cuda.get_device_capability(x.device)
        why.append(f"no kernel for compute capability {major}.{minor}")
    return why


def select_backend(backend: str, tensors: list[torch.Tensor | None], dims: list[int],
                   groups: int) -> str:
    """The backend that serves a call ("cuda" | "torch" | "reference"), or the error of an
    explicit backend that cannot: tensors [x, weight, bias, ...] (biases may be None), dims
    the feature sizes, groups the number of row groups. Host-side checks only."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "torch":
        why = torch_grouped.misfits(tensors, dims, auto=False)
        if why:
            raise ValueError("kernels: backend='torch' cannot run this call: " + "; ".join(why))
        return "torch"
    if backend == "auto":
        if tensors[0].is_cuda:  # CPU never loads the extension
            module, _ = _ext.load()
            if module is not None and not _cuda_misfits(tensors, dims, groups, module):
                return "cuda"
        return "reference" if torch_grouped.misfits(tensors, dims, auto=True) else "torch"
    module = _ext.extension()  # raises ExtensionNotBuiltError with the build command
    why = _cuda_misfits(tensors, dims, groups, module)
    if why:
        raise ValueError("kernels: backend='cuda' cannot run this call: " + "; ".join(why))
    return "cuda"
