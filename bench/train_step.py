#!/usr/bin/env python
"""Training step throughput: dense CLIP vs the same CLIP upcycled to MoE, and open_clip's
training step on the same dense model and batch.

    python bench/train_step.py                 # CPU fp32 + bf16 -> bench/results/train_step_cpu.json
    python bench/train_step.py --device cuda   # bf16 -> bench/results/train_step-<gpu>.json
    python bench/train_step.py [--preset bench-s] [--batch 32] [--steps 6] [--warmup 2]

One process (a 1-rank gloo/NCCL world with megatron-core's groups). Each case is one full
optimizer step exactly as trainer/train.py runs it: ``forward_backward`` through megatron's
schedule (CLIP loss), ``finalize_grads`` (megatron DDP), global-norm clipping, AdamW, zeroing.
Cases (--cases picks some; dense, the baseline, always runs):
  dense       the dense model (model.attention=sdpa, the default)
  dense_unfused  the dense model with megatron's unfused core attention (model.attention=unfused)
  moe_e4_top2 upcycled: E=4, top-2, every other block of both towers, capacity factor 2.0
              (2x the dense model's FFN FLOPs in those blocks: top-2)
  moe_e4_top1 upcycled: E=4, top-1 (the dense model's active FLOPs plus routing)
  open_clip   open_clip.CLIP of the same architecture, its ClipLoss, torch AdamW, clip_grad_norm_
Precisions (--precisions, default fp32,bf16 on CPU and bf16 on CUDA): fp32; bf16 = ours with
train.precision=bf16 (bf16 parameters, fp32 masters) and open_clip under bf16 autocast. On CPU
(bf16 matmuls are 10-20x slower there) the bf16 rows are dense and open_clip only; their case
names end in ``_bf16``.
Timed with time.perf_counter (after torch.cuda.synchronize on GPU), median over --steps timed
steps after --warmup untimed ones; rounds interleave the cases so load drift hits all alike.
Every figure in the JSON was measured by this run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the script's own folder would shadow the `grouped_gemm` package megatron probes for with
# bench/grouped_gemm.py
sys.path[0] = str(REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.hostinfo import cpu_model  # noqa: E402

# A CPU-sized ViT (image 64, patch 8: 65 tokens) and a 32-token text tower; --preset vit-b-16
# for the real thing on a GPU.
PRESETS = {
    "bench-s": ["model.preset=tiny", "model.embed_dim=256", "model.vision.image_size=64",
                "model.vision.patch_size=8", "model.vision.width=256", "model.vision.layers=4",
                "model.vision.heads=4", "model.text.width=256", "model.text.layers=4",
                "model.text.heads=4", "model.text.context_length=32"],
    "vit-b-16": ["model.preset=vit-b-16"],
}
MOE = {"moe_e4_top2": 2, "moe_e4_top1": 1}
DENSE_VARIANTS = {"dense_unfused": ["model.attention=unfused"]}
CASES = ["dense", *DENSE_VARIANTS, *MOE, "open_clip"]


def moe_overrides(top_k: int) -> list[str]:
    out = []
    for tower in ("vision", "text"):
        m = f"model.{tower}.moe."
        out += [m + "num_experts=4", m + "every=2", m + f"top_k={top_k}",
                m + "capacity_factor=2.0"]
    return out


class OursStep:
    def __init__(self, cfg, layout, device):
        from trainer.distributed.grads import wrap_ddp
        from trainer.models.build import build_for_training
        from trainer.optim import build_optimizer

        self.cfg, self.layout = cfg, layout
        self.model = build_for_training(cfg, layout).to(device)
        self.ddp = wrap_ddp(self.model)
        self.opt = build_optimizer(self.model, cfg.train)
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, mb: dict) -> float:
        from trainer.distributed.grads import clip_grads, finalize_grads, zero_grads
        from trainer.step import forward_backward

        out = forward_backward(self.ddp, [mb], self.cfg)
        finalize_grads(self.ddp, self.layout)
        clip_grads(self.ddp, self.layout, 1.0)
        self.opt.step()
        zero_grads(self.ddp, self.opt)
        return out["loss"]


class OpenClipStep:
    def __init__(self, cfg, device, bf16: bool):
        import open_clip
        from open_clip.loss import ClipLoss

        m, v, t = cfg.model, cfg.model.vision, cfg.model.text
        self.model = open_clip.CLIP(
            m.embed_dim, quick_gelu=v.act == "quick_gelu",
            vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                            layers=v.layers, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio),
            text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size,
                          width=t.width, heads=t.heads, layers=t.layers)).to(device)
        self.loss = ClipLoss()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                     fused=device.type == "cuda")
        self.cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self, mb: dict) -> float:
        with self.cast:
            i, t, s = self.model(mb["images"], mb["text"])
            loss = self.loss(i, t, s)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="bench-s", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    ap.add_argument("--precisions", help="comma-separated fp32,bf16 (default: per device)")
    ap.add_argument("--out")
    args = ap.parse_args()
    wanted = {"dense", *args.cases.split(",")}
    if wanted - set(CASES):
        ap.error(f"--cases: unknown {','.join(sorted(wanted - set(CASES)))}; "
                 f"expected some of {','.join(CASES)}")
    device = torch.device(args.device)
    precisions = (args.precisions or ("bf16" if device.type == "cuda" else "fp32,bf16")).split(",")

    from trainer.config import load_config
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
    from trainer.metrics import model_flops_per_sample, peak_flops

    init_distributed(read_launch_env({}))
    layout = ParallelLayout(1).initialize()
    cfgs, steps = {}, {}
    for precision in precisions:
        suffix = "" if precision == "fp32" else f"_{precision}"
        base = PRESETS[args.preset] + [f"train.micro_batch_size={args.batch}",
                                       "train.global_contrastive=false",
                                       f"train.precision={precision}"]
        mine = {"dense": load_config(None, base)}
        if device.type == "cuda" or precision == "fp32":  # CPU bf16: dense and open_clip only
            mine.update({k: load_config(None, base + o) for k, o in DENSE_VARIANTS.items()
                         if k in wanted})
            mine.update({k: load_config(None, base + moe_overrides(k_))
                         for k, k_ in MOE.items() if k in wanted})
        for k, c in mine.items():
            cfgs[k + suffix], steps[k + suffix] = c, OursStep(c, layout, device)
        if "open_clip" in wanted:
            cfgs["open_clip" + suffix] = mine["dense"]
            steps["open_clip" + suffix] = OpenClipStep(mine["dense"], device,
                                                       precision == "bf16")
    from trainer.data.batches import synthetic_microbatches, to_device
    first = next(iter(cfgs.values()))
    mb = to_device(synthetic_microbatches(first, layout, 0)[0], device, first)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.warmup + args.steps):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(mb)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    peak = peak_flops()
    cases = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = model_flops_per_sample(cfgs[name])
        cases[name] = {"step_ms_median": 1e3 * med, "step_ms_all": [1e3 * t for t in ts],
                       "samples_per_s": args.batch / med, "params": steps[name].params,
                       "model_flops_per_sample": flops,
                       "mfu": flops * args.batch / med / peak if peak else None}
    for name in cases:
        dense = "dense" + ("_bf16" if name.endswith("_bf16") else "")
        if dense in cases:
            cases[name]["vs_dense"] = cases[name]["step_ms_median"] / cases[dense]["step_ms_median"]
        peer = "open_clip" + ("_bf16" if name.endswith("_bf16") else "")
        if peer in cases:
            cases[name]["speed_vs_open_clip"] = (cases[peer]["step_ms_median"]
                                                 / cases[name]["step_ms_median"])
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else (platform.processor() or "cpu"))
    cpu = cpu_model() if device.type == "cpu" else name
    from importlib.metadata import version
    result = {
        "benchmark": "train_step", "device": cpu, "device_type": device.type,
        "torch_threads": torch.get_num_threads(), "preset": args.preset,
        "overrides": PRESETS[args.preset], "case_overrides": DENSE_VARIANTS, "batch": args.batch,
        "precisions": precisions,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "megatron_core": version("megatron-core"), "deepspeed": version("deepspeed"),
                     "open_clip": version("open-clip-torch")},
        "timing": f"median of {args.steps} steps after {args.warmup} warmup, cases interleaved",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cases": cases,
    }
    out = Path(args.out) if args.out else REPO / "bench/results" / (
        "train_step_cpu.json" if device.type == "cpu"
        else f"train_step-{name.replace(' ', '_')}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    for k, c in cases.items():
        print(f"{k:17s} {c['step_ms_median']:8.1f} ms  {c['samples_per_s']:7.1f} samples/s  "
              f"x{c.get('vs_dense', float('nan')):.2f} of dense  "
              f"{c.get('speed_vs_open_clip', float('nan')):.2f}x open_clip's speed  "
              f"{c['params'] / 1e6:.2f}M params")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
