#!/usr/bin/env python
"""Host synchronisations per training step of a bf16 MoE model, as the trainer runs it.

    python bench/host_syncs.py --device cuda [--preset tiny] [--steps 20] [--out FILE]
    python bench/host_syncs.py                # CPU: counts host reads of tensor values

One process. Each step is ``Trainer.train_step``'s sequence (forward_backward, finalize_grads,
clip_grads, the finiteness check, AdamW, zeroing) on synthetic batches. On CUDA the steps run
under ``torch.cuda.set_sync_debug_mode("warn")`` and every synchronising call's warning is
counted (with the line that made it); on CPU a TorchDispatchMode counts
``aten._local_scalar_dense`` (what ``.item()``, ``float(t)``, ``int(t)`` call), the CPU optimizer
step excluded (torch's CPU AdamW reads one step counter per parameter; the fused CUDA one does
not). The first step is a warmup and is not counted. Every figure in the JSON is measured.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import platform
import sys
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

MOE = ["model.vision.moe.num_experts=4", "model.vision.moe.every=2",
       "model.text.moe.num_experts=4", "model.text.moe.every=2", "train.precision=bf16"]


def where() -> str:
    """file:line of the innermost frame of our own code."""
    ours = [f for f in traceback.extract_stack()[:-2]
            if "/trainer/" in f.filename or "/kernels/" in f.filename]
    return f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else "?"


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.sites[where()] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dispatch", default="capacity", choices=["capacity", "dropless"])
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device(args.device)

    from trainer.config import load_config
    from trainer.data.batches import synthetic_microbatches, to_device
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
    from trainer.distributed.grads import clip_grads, finalize_grads, wrap_ddp, zero_grads
    from trainer.models.build import build_for_training
    from trainer.optim import build_optimizer
    from trainer.step import forward_backward

    init_distributed(read_launch_env({}))
    layout = ParallelLayout(1).initialize()
    cfg = load_config(None, [f"model.preset={args.preset}", f"train.micro_batch_size={args.batch}",
                             *MOE, *(f"model.{t}.moe.dispatch={args.dispatch}"
                                     for t in ("vision", "text"))])
    model = build_for_training(cfg, layout).to(device)
    ddp, opt = wrap_ddp(model), build_optimizer(model, cfg.train)

    def step(s: int, counter: HostReads | None) -> float:
        mb = [to_device(b, device, cfg) for b in synthetic_microbatches(cfg, layout, s)]
        with counter or contextlib.nullcontext():
            out = forward_backward(ddp, mb, cfg)
            finalize_grads(ddp, layout)
            norm = clip_grads(ddp, layout, 1.0)
            ok = math.isfinite(norm) and math.isfinite(out["loss"])
        if ok:
            opt.step()
        zero_grads(ddp, opt)
        return out["loss"]

    step(0, None)  # warmup
    per_step, sites, losses = [], collections.Counter(), []
    for s in range(1, args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                losses.append(step(s, None))
            torch.cuda.set_sync_debug_mode("default")
            hits = [w for w in caught if "synchroniz" in str(w.message)]
            per_step.append(len(hits))
            sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in hits)
        else:
            counter = HostReads()
            losses.append(step(s, counter))
            per_step.append(sum(counter.sites.values()))
            sites.update(counter.sites)
    from importlib.metadata import version
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    result = {
        "benchmark": "host_syncs", "device": name, "device_type": device.type,
        "preset": args.preset, "batch": args.batch, "dispatch": args.dispatch, "overrides": MOE,
        "what": ("warnings of torch.cuda.set_sync_debug_mode('warn') per step"
                 if device.type == "cuda" else
                 "aten._local_scalar_dense per step (optimizer step excluded)"),
        "per_step": per_step, "median": sorted(per_step)[len(per_step) // 2],
        "sites": dict(sites.most_common()), "losses": losses,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "megatron_core": version("megatron-core"), "deepspeed": version("deepspeed")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(f"host syncs per step: median {result['median']} {per_step}")
    for site, n in sites.most_common(8):
        print(f"  {n:5d}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
