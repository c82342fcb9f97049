#!/usr/bin/env python
"""MoE MLP layer vs the dense MLP at equal active FLOPs: forward+backward wall time.

    python bench/moe_layer.py                # CPU fp32 2 threads -> bench/results/moe_layer_cpu.json
    python bench/moe_layer.py --device cuda  # bf16 -> bench/results/moe_layer-<gpu>-<time>.json
    python bench/moe_layer.py [--batch 8 | --tokens 1576] [--repeats 5] [--warmup 1] [--out FILE]

With top-1 routing every token passes through exactly one expert whose FFN has the dense FFN's
shape (d -> ffn -> d), so the MoE layer does the dense layer's FLOPs plus routing. Both layers
are built as the trainer builds them, inside a 1-process world with megatron-core's groups
(ParallelLayout(1)): the dense one from ``dense_mlp_spec()`` (megatron's MLP, ColumnParallel /
RowParallel linears), the MoE one as ``MoEMLP(tcfg, MoEConfig(num_experts=E, top_k=1, ...))``,
from the same ``tower_transformer_config`` of a ViT tower. The input is [seq, batch, d] ~ N(0, 1).

Timed: one forward (+ the fc2 bias that megatron's bias-dropout-add would add for the dense layer;
the MoE layer adds its experts' biases itself) and ``backward(dy)`` with parameter grads set to
None beforehand, as in training (time.perf_counter, around torch.cuda.synchronize on GPU).
Each of --repeats rounds (after --warmup untimed ones) times, per case, the dense layer, the MoE
layer, its router alone and its experts alone back to back, so that a shared CPU whose load
drifts hits the pair alike; ratio = median over rounds of moe_ms / dense_ms of the same round.

Cases: E in {4, 8} (--experts) x {capacity (drop_tokens, capacity_factor 1.0 and 1.25),
dropless} x the experts' kernels backends (--expert-backend, default auto; e.g.
``--dtype bfloat16 --expert-backend reference torch`` compares the reference loop with torch's
grouped mm in the same rounds; ``served_by`` records which backend ran).
The issue's target is ratio <= 1.3. The JSON records the load average before and after.

Breakdown (per case, from the inputs one real forward hands to each part, timed alone):
  router_fwd_bwd   the Router (logits, top-1, capacity assignment, weights) + aux losses
  experts_fwd_bwd  GroupedExperts = kernels.expert_mlp on the dispatched rows
  rest (derived)   median over rounds of total - router - experts: token dispatch/combine
                   (DeepSpeed encode/decode or the dropless sort + index_add), routing
                   statistics, aux-loss scaler
Then one torch.profiler pass over the slowest MoE case lists the ops that take the time.
No numbers are invented: every figure in the JSON was measured by this run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.hostinfo import cpu_model  # noqa: E402

TARGET_RATIO = 1.3
# (name, d_model, ffn, tokens per image)
SHAPES = {"vit-b-16": (768, 3072, 197), "vit-l-14": (1024, 4096, 257)}
EXPERTS = (4, 8)
DISPATCHES = (("capacity", 1.0), ("capacity", 1.25), ("dropless", None))


# ---- setup ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world() -> None:
    """A 1-process world (gloo on CPU, nccl on GPU) with megatron-core's groups at tp=pp=ep=1."""
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["MASTER_PORT"] = str(free_port())
    init_distributed(read_launch_env(env))
    ParallelLayout(1).initialize(seed=0)


def transformer_config(name: str, dtype: torch.dtype):
    from trainer.config import ModelConfig, VisionConfig
    from trainer.models.clip import tower_transformer_config

    d, ffn, seq = SHAPES[name]
    patch = 16 if name.endswith("16") else 14
    vision = VisionConfig(width=d, layers=12 if d == 768 else 24, heads=d // 64,
                          mlp_ratio=ffn / d, act="gelu", patch_size=patch,
                          image_size=patch * int(math.isqrt(seq - 1)))
    assert vision.seq_length == seq, (vision.seq_length, seq)
    model = ModelConfig(params_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    tcfg = tower_transformer_config(vision, model, tp=1)
    assert (tcfg.hidden_size, tcfg.ffn_hidden_size) == (d, ffn)
    return tcfg


def build_dense(tcfg, device):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from trainer.models.layer_spec import dense_mlp_spec

    mlp = build_module(dense_mlp_spec(), config=tcfg, tp_group=ps.get_tensor_model_parallel_group())
    return mlp.to(device)


def build_moe(tcfg, experts: int, dispatch: str, factor: float | None, device,
              backend: str = "auto"):
    from trainer.moe.config import MoEConfig
    from trainer.moe.layer import MoEMLP

    cfg = MoEConfig(num_experts=experts, every=1, top_k=1, router_init="normal",
                    capacity_factor=factor or 1.0, eval_capacity_factor=factor or 1.0,
                    drop_tokens=True, dispatch=dispatch, expert_backend=backend)
    cfg.validate("bench.moe", 1, "vision", 1)
    return MoEMLP(tcfg, moe=cfg, activation="gelu").to(device)  # experts/router start on CPU


# ---- timing --------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(module, x: torch.Tensor, dy: torch.Tensor):
    """One training-style forward+backward of an ``mlp`` submodule."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        out, bias = module(x)
        if bias is not None:  # megatron's bias-dropout-add adds the dense fc2 bias
            out = out + bias
        out.backward(dy)
    return run


def time_once(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def paired_rounds(dense_fn, cases: dict, device: str, warmup: int, repeats: int) -> dict:
    """Each round times, per case, the dense layer, then the MoE layer, then its router and its
    experts alone, back to back: a shared CPU whose load drifts hits each pair alike.
    -> {"dense": [...], case: {"moe": [...], "router": [...], "experts": [...],
    "paired_ratio": [...]}}."""
    out = {"dense": [], **{k: {"dense": [], "moe": [], "router": [], "experts": [],
                               "paired_ratio": []} for k in cases}}
    for r in range(warmup + repeats):
        for key, fns in cases.items():
            dense_ms = time_once(dense_fn, device)
            moe_ms = time_once(fns["moe"], device)
            router_ms = time_once(fns["router"], device)
            experts_ms = time_once(fns["experts"], device)
            if r < warmup:
                continue
            out["dense"].append(dense_ms)
            rec = out[key]
            rec["dense"].append(dense_ms)
            rec["moe"].append(moe_ms)
            rec["router"].append(router_ms)
            rec["experts"].append(experts_ms)
            rec["paired_ratio"].append(moe_ms / dense_ms)
        if r >= warmup:
            print(f"  round {r - warmup + 1}/{repeats}: dense "
                  f"{statistics.median(out['dense'][-len(cases):]):.0f} ms (median of the "
                  f"round)", flush=True)
    return out


def summary(runs: list[float]) -> dict:
    return {"median_ms": round(statistics.median(runs), 3), "min_ms": round(min(runs), 3),
            "runs_ms": [round(t, 3) for t in runs]}


# ---- breakdown -----------------------------------------------------------------------------

def capture_parts(moe, x: torch.Tensor) -> dict:
    """Run one forward and keep what the router and the experts were called with."""
    seen = {}

    def grab(name):
        def hook(_module, args, kwargs):
            seen[name] = (args, kwargs)
        return hook

    handles = [moe.router.register_forward_pre_hook(grab("router"), with_kwargs=True),
               moe.experts.register_forward_pre_hook(grab("experts"), with_kwargs=True)]
    try:
        with torch.no_grad():
            moe(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def part_fns(moe, seen: dict) -> dict:
    """Zero-arg fwd+bwd closures for the router (+ aux losses) and the experts alone."""
    from trainer.moe.layer import AUX_LOSSES
    from trainer.moe.routing import aux_losses

    (r_in, valid, cap_fn), _ = seen["router"]
    r_in = r_in.detach().clone().requires_grad_()
    (e_in, counts), e_kw = seen["experts"]
    e_in = e_in.detach().clone().requires_grad_()
    dy_e = torch.randn_like(e_in)
    router, experts, cfg = moe.router, moe.experts, moe.cfg
    r_params = list(router.parameters())
    e_params = list(experts.parameters())

    def run_router():
        for p in r_params:
            p.grad = None
        r_in.grad = None
        routing, logits, probs, chosen = router(r_in, valid, cap_fn)
        losses = aux_losses(logits, probs, chosen, valid, cfg.global_threshold())
        total = sum(getattr(cfg.aux, n) * losses[n] for n in AUX_LOSSES if n in losses)
        (total + routing.weights.sum()).backward()  # the combine weights' grad path

    def run_experts():
        for p in e_params:
            p.grad = None
        e_in.grad = None
        experts(e_in, counts, **e_kw).backward(dy_e)

    return {"router": run_router, "experts": run_experts}


def routing_facts(moe, seen: dict, tokens: int) -> dict:
    stats = moe.pop_stats()  # from the capture forward only (popped before it)
    (e_in, counts), e_kw = seen["experts"]
    kept = int(stats["routes_kept"])
    return {"capacity": e_kw.get("stride"), "expert_rows": int(e_in.shape[0]),
            "tokens_per_expert": [int(c) for c in stats["tokens_per_expert"].tolist()],
            "routes_kept": kept, "routes_kept_frac": round(kept / tokens, 4)}


def profile_case(fn, device: str, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:  # fn is warm: it was timed just before
        fn()
        sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    rows = []
    for e in events[:top]:
        row = {"op": e.key, "calls": e.count,
               "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
               "cpu_total_ms": round(e.cpu_time_total / 1e3, 3)}
        if device == "cuda":
            row["self_device_ms"] = round(getattr(e, "self_device_time_total", 0) / 1e3, 3)
        rows.append(row)
    # Autograd nodes by inclusive time: which backward function the self time above sits in.
    nodes = sorted((e for e in prof.key_averages()
                    if e.key.startswith("autograd::engine::evaluate_function")),
                   key=lambda e: e.cpu_time_total, reverse=True)
    backward = [{"node": e.key.split(": ", 1)[-1], "calls": e.count,
                 "cpu_total_ms": round(e.cpu_time_total / 1e3, 3)} for e in nodes[:8]]
    return {"sorted_by": key, "top_ops": rows, "top_backward_nodes": backward}


# ---- main ----------------------------------------------------------------------------------

def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def hidden_shape(args, seq: int) -> tuple[int, int]:
    """[s, b] of the layer input: --batch images of seq tokens, or --tokens rows."""
    if args.tokens:
        return (seq, args.tokens // seq) if args.tokens % seq == 0 else (args.tokens, 1)
    return seq, args.batch


def bench_shape(name: str, args, dtype: torch.dtype, device: str) -> dict:
    import kernels

    d, ffn, seq = SHAPES[name]
    tcfg = transformer_config(name, dtype)
    s, b = hidden_shape(args, seq)
    tokens = s * b
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(s, b, d, generator=gen, device=device).to(dtype).requires_grad_()
    dy = torch.randn(s, b, d, generator=gen, device=device).to(dtype)

    layers = {"dense": build_dense(tcfg, device)}
    cases = {}
    for e in args.experts:
        for dispatch, factor in DISPATCHES:
            for backend in args.expert_backend:
                key = f"E{e}_{dispatch}" + (f"_cf{factor}" if factor else "")
                if len(args.expert_backend) > 1:
                    key += f"@{backend}"
                layers[key] = build_moe(tcfg, e, dispatch, factor, device, backend)
                cases[key] = {"experts": e, "dispatch": dispatch, "capacity_factor": factor,
                              "drop_tokens": dispatch == "capacity", "top_k": 1,
                              "expert_backend": backend}
    for m in layers.values():
        m.train()
    step = {k: step_fn(m, x, dy) for k, m in layers.items()}
    facts, case_fns = {}, {}
    for key in cases:
        moe = layers[key]
        moe.pop_stats()
        calls = kernels.BACKEND_CALLS.copy()
        seen = capture_parts(moe, x)  # one forward: what the router and the experts receive
        facts[key] = routing_facts(moe, seen, tokens)
        facts[key]["served_by"] = [b for (fn, b) in kernels.BACKEND_CALLS - calls
                                   if fn == "expert_mlp"]
        case_fns[key] = {"moe": step[key], **part_fns(moe, seen)}
    print(f"[{name}] d={d} ffn={ffn} tokens={tokens} ([{s}, {b}, {d}]) dtype={dtype}: "
          f"{args.warmup} warmup + {args.repeats} timed rounds of dense/MoE/router/experts "
          f"per case", flush=True)
    times = paired_rounds(step["dense"], case_fns, device, args.warmup, args.repeats)
    dense = summary(times["dense"])
    print(f"  dense                 {dense['median_ms']:9.2f} ms", flush=True)

    results = []
    for key, info in cases.items():
        t = times[key]
        total = summary(t["moe"])
        ratio = statistics.median(t["paired_ratio"])
        router_ms, experts_ms = statistics.median(t["router"]), statistics.median(t["experts"])
        rest = statistics.median([m - r - e for m, r, e in zip(t["moe"], t["router"],
                                                                 t["experts"])])
        results.append({
            "case": key, **info, **facts[key], **total,
            "ratio": round(ratio, 3),
            "ratio_of_medians": round(total["median_ms"] / dense["median_ms"], 3),
            "paired_ratios": [round(v, 3) for v in t["paired_ratio"]],
            "meets_target": ratio <= TARGET_RATIO,
            "breakdown_ms": {
                "router_fwd_bwd": round(router_ms, 3),
                "experts_fwd_bwd": round(experts_ms, 3),
                "rest_derived": round(rest, 3),
                "experts_over_dense_paired": round(statistics.median(
                    [e / dn for e, dn in zip(t["experts"], t["dense"])]), 3),
            },
        })
        print(f"  {key:21s} {total['median_ms']:9.2f} ms  ratio {ratio:5.2f}  (router "
              f"{router_ms:.1f}, experts {experts_ms:.1f}, rest {rest:.1f} ms; kept "
              f"{facts[key]['routes_kept']}/{tokens})", flush=True)

    profile = None
    if args.profile:
        worst = max(results, key=lambda r: r["ratio"])
        profile = {"case": worst["case"], "moe": profile_case(step[worst["case"]], device),
                   "dense": profile_case(step["dense"], device, top=8)}
    del layers, step, case_fns
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "d_model": d, "ffn_hidden": ffn, "seq": s, "batch": b,
            "tokens": tokens, "hidden_shape": [s, b, d], "dense": dense, "cases": results,
            "profile": profile}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch", type=int, help="images per step (default: 8 on cpu, 64 on cuda)")
    p.add_argument("--tokens", type=int, help="rows of the layer input (overrides --batch)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                   help="default: vit-b-16 on cpu, vit-b-16 and vit-l-14 on cuda")
    p.add_argument("--repeats", type=int, help="timed rounds (default 5 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (cpu only)")
    p.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS),
                   help=f"expert counts (default {' '.join(map(str, EXPERTS))})")
    p.add_argument("--expert-backend", nargs="+", default=["auto"],
                   choices=["auto", "cuda", "torch", "reference"],
                   help="kernels backend(s) of the experts (moe.expert_backend); several: each "
                        "case once per backend, timed in the same rounds")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/moe_layer.py: --device cuda but no CUDA device; refusing (no numbers are "
              "invented). Run with --device cpu.", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.batch = args.batch or (64 if cuda else 8)
    args.repeats = args.repeats or (20 if cuda else 5)
    shapes = args.shapes or (list(SHAPES) if cuda else ["vit-b-16"])
    if not cuda:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load_before = os.getloadavg()
    init_world()
    import deepspeed
    import megatron.core

    import kernels

    print(kernels.extension_status(), flush=True)
    results = [bench_shape(name, args, dtype, device) for name in shapes]

    report = {
        "benchmark": "moe_layer",
        "device": device_description(device),
        "device_type": device,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "megatron_core": megatron.core.__version__,
                     "deepspeed": deepspeed.__version__},
        "kernels": kernels.extension_status(),
        "world": "1 process, " + ("nccl" if cuda else "gloo") + ", megatron groups tp=pp=ep=1",
        "dense_layer": "megatron.core.transformer.mlp.MLP via trainer.models.layer_spec."
                       "dense_mlp_spec (fc1 + gelu + fc2, biases); output + fc2 bias",
        "moe_layer": "trainer.moe.layer.MoEMLP, top_k=1, router_init=normal, activation=gelu, "
                     "default aux weights (load_balance 0.01)",
        "timing": f"{args.repeats} timed rounds after {args.warmup} warmup; per round and case: "
                  f"dense, MoE, router alone, experts alone back to back; medians over rounds; "
                  f"time.perf_counter"
                  + (" around torch.cuda.synchronize" if cuda else ""),
        "ratio": "median over rounds of moe_ms / dense_ms timed back to back (equal active "
                 "FLOPs: top-1, expert FFN = dense FFN); ratio_of_medians beside it",
        "target_ratio": TARGET_RATIO,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None,
        "shapes": results,
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["loadavg_1_5_15"] = {"before": [round(v, 2) for v in load_before],
                                "after": [round(v, 2) for v in os.getloadavg()]}
    out = args.out
    if out is None:
        if cuda:
            slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = REPO / "bench" / "results" / f"moe_layer-{slug}-{stamp}.json"
        else:
            out = REPO / "bench" / "results" / "moe_layer_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['wall_s']} s)")
    with contextlib.suppress(Exception):
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
