"""One optimizer step: microbatches through megatron-core's schedule, gradient sync by
megatron-core's DistributedDataParallel, true global-norm clipping, AdamW.

    model = build_model(cfg, layout)          # this pipeline stage of CLIP
    ddp = wrap_ddp(model)                     # grads land in ddp's buffers (param.main_grad)
    opt = build_optimizer(model, cfg)
    metrics = forward_backward(ddp, microbatches, cfg)
    finalize_grads(ddp, layout)               # DP / expert-DP reduce, routers over TP
    norm = clip_grads(model, layout, cfg.train.grad_clip)
    set_lr(opt, lr_at(step, cfg.train)); opt.step(); zero_grads(ddp, opt)

The schedule is ``get_forward_backward_func()``: no pipelining at pp=1, 1F1B otherwise. Only
the last stage computes the loss.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from typing import Iterator

import torch
import torch.distributed as dist

from trainer.config import Config, TrainConfig
from trainer.distributed.layout import ParallelLayout
from trainer.losses import clip_loss, region_text_loss, siglip_loss


def build_model(cfg: Config, layout: ParallelLayout) -> torch.nn.Module:
    """This pipeline stage of CLIP, with ``train.trainable`` applied (frozen params have
    ``requires_grad=False``: no gradient buffer, no optimizer state, never updated)."""
    from trainer.models.clip import CLIP

    model = CLIP(cfg.model, cfg.parallel, pre_process=layout.is_first_stage,
                 post_process=layout.is_last_stage,
                 recompute=cfg.train.activation_checkpointing)
    apply_trainable(model, cfg.train.trainable)
    return model


# train.trainable names: canonical parameter names (trainer/models/state.py) they select
TRAINABLE_SETS = {
    "ffn": ("*.mlp.linear_fc1.*", "*.mlp.linear_fc2.*", "*.mlp.deepspeed_moe.experts.*"),
    "experts": ("*.mlp.deepspeed_moe.experts.*",),
    "router": ("*.mlp.deepspeed_moe.gate.*",),
}


def trainable_patterns(entries: list[str]) -> list[str]:
    """``train.trainable`` entries -> glob patterns over canonical parameter names."""
    out = []
    for entry in entries:
        out += list(TRAINABLE_SETS.get(entry, (entry,)))
    return out


def apply_trainable(model: torch.nn.Module, entries: list[str]) -> int:
    """Freezes every parameter that no entry of ``train.trainable`` selects (empty or "all":
    nothing is frozen). Returns how many parameter tensors stay trainable on this rank;
    ``build_optimizer`` refuses a model with none."""
    from trainer.models.state import canonical_names

    if not entries or "all" in entries:
        return sum(1 for _ in model.parameters())
    patterns = trainable_patterns(entries)
    names = canonical_names(model)
    kept = 0
    for name, p in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(names[name], pat) for pat in patterns)
        p.requires_grad_(keep)
        kept += keep
    return kept


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """megatron-core DDP: dense grads averaged over DP, expert grads (``allreduce=False``)
    summed over expert-DP and divided by DP, in fp32 buffers (``param.main_grad``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def autocast(cfg: TrainConfig):
    """bf16 autocast on CUDA (``precision=auto|bf16``), or on CPU when asked for; fp32 else."""
    cuda = torch.cuda.is_available()
    if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda):
        return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ forward

def contrastive_group(cfg: TrainConfig):
    """The data-parallel group whose micro-batches give the negatives (None: this rank's)."""
    from megatron.core import parallel_state as ps
    if not cfg.global_contrastive:
        return None
    group = ps.get_data_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def compute_loss(out: dict, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """The training objective from the model's outputs: the contrastive (CLIP or SigLIP) loss
    plus ``region_loss_weight`` x the CLOC region-text loss. Router aux losses ride on the MoE
    layer outputs (trainer/moe/layer.py), not here."""
    group = contrastive_group(cfg)
    img, txt, scale = out["image_features"].float(), out["text_features"].float(), out["logit_scale"]
    if cfg.loss == "siglip":
        loss = siglip_loss(img, txt, scale, out["logit_bias"], group=group)
    else:
        loss = clip_loss(img, txt, scale, group=group)
    metrics = {"contrastive_loss": loss.detach().clone()}
    if "region_features" in out:
        region = region_text_loss(out["region_features"].float(),
                                  out["region_text_features"].float(),
                                  batch["region_mask"], scale, group=group)
        metrics["region_loss"] = region.detach().clone()
        loss = loss + cfg.region_loss_weight * region
    # a copy: the schedule divides the returned loss by num_microbatches in place
    metrics["loss"] = loss.detach().clone()
    return loss, metrics


def route_labels(model: torch.nn.Module, labels: torch.Tensor | None) -> None:
    """Hands the microbatch's class labels to the super-class guided MoE layers (Mobile V-MoE,
    trainer/moe/layer.py); None clears them."""
    for m in unwrap(model).modules():
        if getattr(m, "uses_class_labels", False):
            m.class_labels = labels


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, cfg: TrainConfig):
    batch = next(data_iterator)
    route_labels(model, batch.get("labels"))
    regions = cfg.region_loss_weight > 0 and "region_boxes" in batch
    with autocast(cfg):
        output = model(batch.get("images"), batch.get("text"),
                       batch.get("region_boxes") if regions else None,
                       batch.get("region_text") if regions else None)
    return output, functools.partial(compute_loss, batch=batch, cfg=cfg)


def _batch_size(mb: dict) -> int:
    return mb["size"] if "size" in mb else mb["text"].shape[0]


def forward_backward(model: torch.nn.Module, microbatches: list[dict], cfg: Config,
                     forward_only: bool = False) -> dict | None:
    """Runs every microbatch forward (and backward); the schedule divides each microbatch
    loss by their number. Returns the metrics averaged over microbatches on the last stage
    (``loss``, ``contrastive_loss``, ``region_loss``), None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # MoE aux losses ride on the layer outputs; their gradient is scaled like the main loss
    # (which the schedule divides by the number of microbatches).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(microbatches)))
    try:
        losses = get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, cfg=cfg.train),
            data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=cfg.model.vision.seq_length,
            micro_batch_size=_batch_size(microbatches[0]), forward_only=forward_only)
    finally:
        route_labels(model, None)  # evaluation forwards carry no labels
    if not losses:
        return None
    return {k: float(torch.stack([d[k] for d in losses]).mean()) for k in losses[0]}


# ------------------------------------------------------------------------------ gradients

def finalize_grads(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """After backward: reduce the DDP buffers, then sum the routers over TP, and point every
    ``param.grad`` at its reduced ``main_grad`` for the optimizer.

    Routers at TP > 1 saw only their TP rank's share of the routing units and are marked
    ``sequence_parallel``; megatron sums those over TP only when the whole tower runs
    sequence-parallel, which ours does not, so the sum is done here.
    """
    model.finish_grad_sync()
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if layout.tp > 1:
        _flat_allreduce([p.main_grad for p in params if getattr(p, "sequence_parallel", False)],
                        layout.tp_group())
    for p in params:
        p.grad = p.main_grad


def zero_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)


def _flat_allreduce(grads: list[torch.Tensor], group) -> None:
    """Sum ``grads`` over ``group`` in one coalesced all-reduce."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(model: torch.nn.Module, layout: ParallelLayout) -> float:
    """L2 norm of the full model's gradient: TP shards summed, TP replicas counted once,
    experts summed over their EP group, pipeline stages summed."""
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    sq = torch.zeros((), dtype=torch.float64)
    sq_experts = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if not getattr(p, "allreduce", True):
            sq_experts += p.grad.detach().double().pow(2).sum().cpu()
        elif getattr(p, "tensor_model_parallel", False) or layout.tp_rank == 0:
            sq += p.grad.detach().double().pow(2).sum().cpu()
    device = next(model.parameters()).device
    if layout.ep > 1:
        sq_experts = sq_experts.to(device)
        dist.all_reduce(sq_experts, group=layout.ep_group())
    # every TP rank of a stage now holds all of that stage's experts: count them once
    sq = sq + sq_experts.cpu() / layout.tp
    if layout.tp * layout.pp > 1:
        sq = sq.to(device)
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return math.sqrt(float(sq))


def clip_grads(model: torch.nn.Module, layout: ParallelLayout, max_norm: float) -> float:
    """Scales the grads to ``max_norm`` when above it (0: no clipping); returns the norm
    before clipping (nan/inf when a gradient is not finite: nothing is scaled then)."""
    norm = global_grad_norm(model, layout)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in unwrap(model).parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


# ------------------------------------------------------------------------------ optimizer

def param_kind(name: str, p: torch.nn.Parameter) -> str:
    """expert | router | dense: which learning-rate multiplier applies."""
    if not getattr(p, "allreduce", True):
        return "expert"
    if ".deepspeed_moe.gate." in name:
        return "router"
    return "dense"


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with up to six param groups: (dense | expert | router) x (decay | no decay).
    As open_clip: no weight decay on gains, biases (the experts' stacked ``b1``/``b2`` too),
    the class embedding and the logit scale/bias. Each group carries ``lr_mult``; ``set_lr``
    applies it."""
    from trainer.models.state import canonical_names

    t = cfg.train
    mult = {"dense": 1.0, "expert": t.lr_mult_experts, "router": t.lr_mult_routers}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        decay = (p.ndim >= 2 and "logit_" not in name
                 and not name.endswith(("bias", "experts.b1", "experts.b2")))
        groups.setdefault((param_kind(name, p), decay), []).append(p)
    if not groups:
        example = next(iter(canonical_names(unwrap(model)).values()))
        raise ValueError(f"train.trainable={t.trainable!r} selects no parameter of this model "
                         f"(pipeline stage); canonical names look like {example!r}")
    param_groups = [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
                     "lr_mult": mult[kind], "name": f"{kind}_{'decay' if decay else 'no_decay'}"}
                    for (kind, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=torch.cuda.is_available())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warmup from 0 over
    ``warmup_steps``, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at ``steps`` (or
    constant)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float) -> None:
    """CLIP clamps the learned temperature: exp(logit_scale) <= max_scale."""
    model = unwrap(model)
    if hasattr(model, "logit_scale"):
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(max_scale))
