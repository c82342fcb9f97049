"""What a run reports: JSONL metrics, TensorBoard scalars, a progress bar, MoE routing
statistics per layer, which kernels backend ran the experts, throughput and model FLOPs
utilisation.

Only the reporting rank (last pipeline stage, TP rank 0, DP rank 0) writes; every rank joins
the collectives that bring the MoE statistics to it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from trainer.config import Config, ModelConfig, WandbConfig
from trainer.distributed.layout import ParallelLayout
from trainer.moe.routing import capacity_for

log = logging.getLogger("upclip")

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring; MFU is reported only for these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def model_flops_per_sample(cfg: Config, moe_active: bool = True) -> float:
    """Training FLOPs of one image-text pair, counting 2 FLOPs per multiply-add of every
    matmul (attention scores included): backward = 2x forward, except the patch embedding
    (no gradient w.r.t. the pixels); MoE layers count the top-k experts a token runs."""
    total = 0.0
    towers = ((cfg.model.vision, cfg.model.vision.seq_length),
              (cfg.model.text, cfg.model.text.context_length))
    for tower, s in towers:
        d, f = tower.width, int(tower.width * tower.mlp_ratio)
        moe_layers = set(tower.moe.moe_layers(tower.layers)) if moe_active else set()
        for i in range(tower.layers):
            mlp = 2 * s * 2 * d * f * (tower.moe.top_k if i in moe_layers else 1)
            router = 2 * s * d * tower.moe.num_experts if i in moe_layers else 0
            total += mlp + router + _attention_flops(s, d)
        total += 2 * d * cfg.model.embed_dim  # the projection of the pooled token
    return 3 * total + 2 * _patch_embed_flops(cfg.model.vision)


def _attention_flops(s: int, d: int) -> float:
    """q, k, v, out projections + scores and weighted sum, one sequence of s tokens."""
    return 2 * s * 4 * d * d + 2 * 2 * s * s * d


def _patch_embed_flops(vision) -> float:
    return 2 * vision.num_patches * 3 * vision.patch_size ** 2 * vision.width


def expert_tokens(moe, units: int, per_unit: int) -> int:
    """Tokens one MoE layer's experts compute per call of ``units`` routing units (tokens, or
    images of ``per_unit`` tokens) at evaluation: every expert's capacity buffer,
    ``E * C`` units with ``C`` from ``eval_capacity_factor`` by ``capacity_rule`` (what
    fixed-shape dispatch computes), never more than the ``k * units`` routes that exist;
    dropless or ``drop_tokens: false``: ``k * units``."""
    routes = moe.top_k * units
    if moe.dropless:
        return routes * per_unit
    slots = moe.num_experts * capacity_for(units, moe.num_experts, moe.eval_capacity_factor,
                                           moe.top_k, moe.min_capacity, moe.capacity_rule)
    return min(slots, routes) * per_unit


def inference_flops_per_sample(model: ModelConfig, batch_size: int) -> dict[str, float]:
    """Forward FLOPs of one image-text pair at evaluation routing, when ``batch_size`` pairs
    go through each tower together (one routing group; tensor parallel size 1), 2 FLOPs per
    multiply-add as ``model_flops_per_sample``: -> {"vision", "text", "total"}. An MoE layer
    counts its router (per routing unit) and ``expert_tokens`` expert MLP passes spread over
    the batch, so the capacity factor, the capacity rule and top-k move the count (CLIP-UP's
    quality-vs-FLOPs dial); a dense layer counts one MLP pass per token."""
    out = {}
    for name, tower, s in (("vision", model.vision, model.vision.seq_length),
                           ("text", model.text, model.text.context_length)):
        d, f, moe = tower.width, int(tower.width * tower.mlp_ratio), tower.moe
        moe_layers = set(moe.moe_layers(tower.layers))
        image_units = name == "vision" and moe.routing == "image"
        units, per_unit = (batch_size, s) if image_units else (batch_size * s, 1)
        total = 0.0
        for i in range(tower.layers):
            total += _attention_flops(s, d)
            if i in moe_layers:
                total += 2 * d * moe.num_experts * units / batch_size          # router
                total += 2 * 2 * d * f * expert_tokens(moe, units, per_unit) / batch_size
            else:
                total += 2 * 2 * d * f * s
        total += 2 * d * model.embed_dim                 # the projection of the pooled token
        if name == "vision":
            total += _patch_embed_flops(tower)
        out[name] = total
    out["total"] = out["vision"] + out["text"]
    return out


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((f for k, f in PEAK_BF16_FLOPS.items() if k in name), None)


def moe_layer_stats(model: torch.nn.Module, layout: ParallelLayout) -> dict[str, dict]:
    """Per MoE layer since the last call, summed over the data-parallel replicas (TP rank 0
    of each stage) and brought to the last stage: ``{"vision.3": {"load": [fraction of routed
    units per expert], "dropped": fraction of wanted routes dropped, "entropy": mean router
    entropy, "load_balance": aux value}}``. Collective over the DP and pipeline groups."""
    from trainer.moe.layer import MoEMLP

    local: dict[str, dict] = {}
    towers = [("vision", model.visual.transformer)]
    if hasattr(model, "text"):
        towers.append(("text", model.text.transformer))
    for tower, block in towers:
        for layer in block.layers:
            if isinstance(layer.mlp, MoEMLP):
                st = layer.mlp.pop_stats()
                if st:
                    local[f"{tower}.{layer.layer_number - 1}"] = st
    if local:  # sum over the data-parallel replicas of this stage
        names = sorted(local)
        keys = ("tokens_per_expert", "routes_wanted", "routes_kept", "entropy_sum", "units",
                "aux_load_balance", "calls")
        flat = torch.cat([local[n][k].reshape(-1).float() for n in names for k in keys])
        if layout.dp > 1:
            dist.all_reduce(flat, group=layout.dp_group())
        flat = flat.cpu()
        out, i = {}, 0
        for n in names:
            got = {}
            for k in keys:
                size = local[n][k].numel()
                got[k] = flat[i:i + size]
                i += size
            tokens = got["tokens_per_expert"]
            out[n] = {"load": [round(float(x), 4) for x in tokens / tokens.sum().clamp_min(1)],
                      "dropped": float(1 - got["routes_kept"] / got["routes_wanted"].clamp_min(1)),
                      "entropy": float(got["entropy_sum"] / got["units"].clamp_min(1)),
                      "load_balance": float(got["aux_load_balance"] / got["calls"])}
        local = out
    if layout.pp == 1:
        return local
    gathered = [None] * layout.pp
    from megatron.core import parallel_state as ps
    dist.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
    return {k: v for part in gathered for k, v in part.items()}


def expert_calls(before: Counter) -> Counter:
    """kernels.expert_mlp calls per backend since the snapshot ``before`` of
    ``kernels.BACKEND_CALLS`` (host counters: no device work)."""
    return Counter({b: n for (fn, b), n in (kernels.BACKEND_CALLS - before).items()
                    if fn == "expert_mlp"})


def backend_calls(calls: Counter, device: torch.device) -> dict[str, int]:
    """``{"cuda": n, "torch": n, "reference": n}``: expert-MLP calls per kernels backend,
    summed over every rank (every MoE layer of every stage). Collective over the world."""
    vec = torch.tensor([float(calls.get(b, 0)) for b in kernels.SERVED_BY],
                       dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    return {b: int(v) for b, v in zip(kernels.SERVED_BY, vec.tolist())}


class MetricsLogger:
    """JSONL (``run_dir/metrics.jsonl``, one object per logged step, appended across
    restarts), TensorBoard (``run_dir/tensorboard``), Weights & Biases (``wandb``, with the
    resolved ``config``: trainer/wandb_logger.py) and a tqdm bar on a terminal."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress_bar: bool = True,
                 wandb: WandbConfig | None = None, config: dict | None = None):
        self.enabled = enabled
        self.file = self.writer = self.bar = self.wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        if wandb is not None and wandb.enabled:
            from trainer.wandb_logger import WandbLogger
            self.wandb = WandbLogger(wandb, run_dir, config or {})
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0, self.step0 = time.time(), start_step

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = _flatten(metrics)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, scalars)

    def progress(self, step: int, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}",
                                 refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        for h in (self.bar, self.writer, self.wandb, self.file):
            if h is not None:
                h.close()


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            out.update({f"{key}/{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out
