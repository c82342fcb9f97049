"""Grouped GEMM / expert MLP throughput for CLIP expert shapes.

    python bench/grouped_gemm.py [--quick] [--iters 20] [--out FILE]   # needs a CUDA GPU
    python bench/grouped_gemm.py --cpu                                 # reference, tiny shapes

On CUDA: forward and forward+backward TFLOP/s of one grouped linear layer (x @ w[e] per group)
for our extension, torch's grouped_mm called raw, kernels' torch backend (torch's grouped_mm
with the row plan, padding masks and one-hot bias of kernels/torch_grouped.py), a loop of cuBLAS
matmuls (the kernels reference), and one dense matmul of the same FLOPs; plus the expert MLP
(fc1 + act + fc2) on the extension, the torch backend and the loop.
Medians over CUDA events; results go to bench/results/grouped_gemm-<device>-<time>.json with the
device, torch/CUDA versions and every shape. Without a GPU it refuses (no numbers are invented);
--cpu times the reference, the torch backend and raw grouped_mm at tiny fp32 shapes and prints
them (no file unless --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels  # noqa: E402

SHAPES = [(768, 3072), (1024, 4096)]  # (d_model, d_ff): ViT-B/16, ViT-L/14
EXPERTS = [8, 16]
ROWS_PER_EXPERT = [512, 2048, 8192, 16384]
DISTRIBUTIONS = ["balanced", "skewed"]


def make_counts(kind: str, experts: int, rows_per_expert: int) -> list[int]:
    """Same total rows either way; skewed: power-law weights and the last quarter empty."""
    total = experts * rows_per_expert
    if kind == "balanced":
        return [rows_per_expert] * experts
    weights = [1.0 / (i + 1) ** 1.2 for i in range(experts)]
    for i in range(experts - experts // 4, experts):
        weights[i] = 0.0
    scale = total / sum(weights)
    counts = [int(w * scale) for w in weights]
    counts[0] += total - sum(counts)
    return counts


def grouped_mm_fn() -> tuple[str, Callable | None]:
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is not None:
        return "torch.nn.functional.grouped_mm", fn
    fn = getattr(torch, "_grouped_mm", None)
    return ("torch._grouped_mm", fn) if fn is not None else ("grouped_mm", None)


def cuda_median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor):
    def run():
        torch.autograd.grad(forward(), inputs, dy)
    return run


def linear_impls(x, w, counts_list, device):
    """name -> zero-arg forward for one grouped linear layer."""
    counts_dev = torch.tensor(counts_list, device=device, dtype=torch.int32)
    counts_cpu = torch.tensor(counts_list)
    impls = {}
    if device == "cuda" and kernels.extension_available():
        impls["upclip_cuda"] = lambda: kernels.grouped_gemm(x, w, counts_dev, backend="cuda")
    name, fn = grouped_mm_fn()
    if fn is not None:
        offs = torch.cumsum(counts_dev, 0, dtype=torch.int32)
        impls[name] = lambda: fn(x, w, offs=offs)
        impls["upclip_torch(grouped_mm)"] = lambda: kernels.grouped_gemm(x, w, counts_dev,
                                                                        backend="torch")
    if device == "cuda":
        dense_x = x[: sum(counts_list)]
        impls["dense_matmul_same_flops"] = lambda: dense_x @ w[0]
    impls["loop_cublas(reference)"] = lambda: kernels.grouped_gemm(x, w, counts_cpu,
                                                                   backend="reference")
    return impls


def mlp_impls(x, w1, b1, w2, b2, counts_list, activation, device):
    counts_dev = torch.tensor(counts_list, device=device, dtype=torch.int32)
    counts_cpu = torch.tensor(counts_list)
    impls = {}
    if device == "cuda" and kernels.extension_available():
        impls["upclip_cuda"] = lambda: kernels.expert_mlp(x, w1, b1, w2, b2, counts_dev,
                                                          activation=activation, backend="cuda")
    if grouped_mm_fn()[1] is not None:
        impls["upclip_torch(grouped_mm)"] = lambda: kernels.expert_mlp(
            x, w1, b1, w2, b2, counts_dev, activation=activation, backend="torch")
    impls["loop_cublas(reference)"] = lambda: kernels.expert_mlp(
        x, w1, b1, w2, b2, counts_cpu, activation=activation, backend="reference")
    return impls


def bench_case(d, ff, experts, rows_per_expert, kind, dtype, device, warmup, iters, timer):
    counts = make_counts(kind, experts, rows_per_expert)
    rows = sum(counts)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = randn(rows, d).requires_grad_()
    w = randn(experts, d, ff, scale=d ** -0.5).requires_grad_()
    results = []

    def record(op, impl, mode, flops, fn):
        try:
            ms = timer(fn, warmup, iters)
            entry = {"median_ms": round(ms, 4), "tflops": round(flops / (ms * 1e-3) / 1e12, 2)}
        except Exception as error:  # a baseline that does not support this layout/device
            entry = {"error": f"{type(error).__name__}: {error}"[:300]}
        results.append({"op": op, "impl": impl, "mode": mode, "d_model": d, "d_ff": ff,
                        "experts": experts, "rows_per_expert": rows_per_expert,
                        "distribution": kind, "counts": counts, "flops": flops, **entry})
        shown = entry.get("tflops", entry.get("error"))
        print(f"  {op:10s} {impl:32s} {mode:7s} d={d} ff={ff} E={experts} rows/E={rows_per_expert}"
              f" {kind:8s} -> {shown}", flush=True)

    flops = 2 * rows * d * ff
    dy = randn(rows, ff)
    for impl, forward in linear_impls(x, w, counts, device).items():
        record("linear", impl, "fwd", flops, lambda: forward())
        record("linear", impl, "fwd+bwd", 3 * flops, fwd_bwd(forward, [x, w], dy))
    del dy

    b1 = randn(experts, ff, scale=0.1).requires_grad_()
    w2 = randn(experts, ff, d, scale=ff ** -0.5).requires_grad_()
    b2 = randn(experts, d, scale=0.1).requires_grad_()
    dy = randn(rows, d)
    for impl, forward in mlp_impls(x, w, b1, w2, b2, counts, "gelu", device).items():
        record("expert_mlp", impl, "fwd", 2 * flops, lambda: forward())
        record("expert_mlp", impl, "fwd+bwd", 6 * flops,
               fwd_bwd(forward, [x, w, b1, w2, b2], dy))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="reference and torch backends, tiny fp32 shapes, no file")
    parser.add_argument("--quick", action="store_true", help="one shape, E=8, two row counts")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)

    if args.cpu:
        device, timer = "cpu", cpu_median_ms
        dtype = torch.float32  # bf16 matmul on CPU is 10-20x slower and not what we ship
        grid = [(64, 256, 4, 64, kind) for kind in DISTRIBUTIONS]
    elif not torch.cuda.is_available():
        print("bench/grouped_gemm.py: no CUDA device, refusing to benchmark (GPU numbers are "
              "only recorded on GPUs). Use --cpu to time the reference at tiny shapes.",
              file=sys.stderr)
        return 2
    else:
        device, timer = "cuda", cuda_median_ms
        dtype = getattr(torch, args.dtype)
        shapes, experts, rows = SHAPES, EXPERTS, ROWS_PER_EXPERT
        if args.quick:
            shapes, experts, rows = SHAPES[:1], EXPERTS[:1], [512, 8192]
        grid = [(d, ff, e, r, kind) for d, ff in shapes for e in experts for r in rows
                for kind in DISTRIBUTIONS]

    print(kernels.extension_status(), flush=True)
    results = []
    for d, ff, e, r, kind in grid:
        results.extend(bench_case(d, ff, e, r, kind, dtype, device, args.warmup, args.iters,
                                  timer))
        if device == "cuda":
            torch.cuda.empty_cache()

    report = {
        "benchmark": "grouped_gemm",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype),
        "extension": kernels.extension_status(),
        "grouped_mm": grouped_mm_fn()[0] if grouped_mm_fn()[1] is not None else None,
        "timing": f"median of {args.iters} iters after {args.warmup} warmup "
                  f"({'CUDA events' if device == 'cuda' else 'perf_counter'})",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    out = args.out
    if out is None and device == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = REPO / "bench" / "results" / f"grouped_gemm-{slug}-{stamp}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
