"""One optimizer step: microbatches through megatron-core's schedule, then DP grad sync,
global-norm clipping and the optimizer.

The schedule is ``get_forward_backward_func()``: no pipelining at pp=1, 1F1B otherwise. Only
the last stage computes the loss; every stage returns what the schedule needs.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.distributed.layout import ParallelLayout
from trainer.losses import clip_loss


def build_model(cfg: Config, layout: ParallelLayout) -> torch.nn.Module:
    from trainer.models.clip import CLIP

    return CLIP(cfg.model, cfg.parallel, pre_process=layout.is_first_stage,
                post_process=layout.is_last_stage)


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = next(data_iterator)
    output = model(batch.get("images"), batch.get("text"))

    def loss_func(output):
        image_features, text_features, logit_scale = output
        loss = clip_loss(image_features, text_features, logit_scale)
        # a copy: the schedule divides the returned loss by num_microbatches in place
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def forward_backward(model: torch.nn.Module, microbatches: list[dict], cfg: Config,
                     forward_only: bool = False) -> float | None:
    """Runs every microbatch forward and backward; grads accumulate in ``param.grad`` (the
    schedule divides each microbatch loss by their number). Returns the mean loss on the last
    stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    mcfg = cfg.model
    # MoE aux losses ride on the layer outputs; their gradient is scaled like the main loss
    # (which the schedule divides by the number of microbatches).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(microbatches)))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=mcfg.vision.seq_length,
        micro_batch_size=microbatches[0]["size"], forward_only=forward_only)
    if not losses:
        return None
    return float(torch.stack([d["loss"] for d in losses]).mean())


def _flat_allreduce(grads: list[torch.Tensor], group, scale: float) -> None:
    """Sum ``grads`` over ``group`` in one coalesced all-reduce, then multiply by ``scale``."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat *= scale
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_grads(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """Gradient of the mean loss over the data-parallel replicas.

    Dense params: averaged over DP. Expert params (``allreduce=False``): each already holds
    the contributions of every replica in its EP group (the all-to-all brought their tokens),
    so they are summed over expert-DP and divided by DP. Routers at TP > 1 saw only their TP
    rank's share of the tokens (``sequence_parallel``): summed over TP first.
    """
    from megatron.core import parallel_state as ps

    params = [p for p in model.parameters() if p.grad is not None]
    if layout.tp > 1:
        _flat_allreduce([p.grad for p in params if getattr(p, "sequence_parallel", False)],
                        layout.tp_group(), 1.0)
    if layout.dp > 1:
        _flat_allreduce([p.grad for p in params if getattr(p, "allreduce", True)],
                        layout.dp_group(), 1.0 / layout.dp)
    experts = [p.grad for p in params if not getattr(p, "allreduce", True)]
    if experts and ps.get_expert_data_parallel_world_size() > 1:  # spans TP ranks too
        _flat_allreduce(experts, ps.get_expert_data_parallel_group(), 1.0 / layout.dp)
    elif layout.dp > 1:
        for g in experts:
            g /= layout.dp


def global_grad_norm(model: torch.nn.Module, layout: ParallelLayout) -> float:
    """L2 norm of the full model's gradient: TP shards summed, TP replicas counted once,
    experts summed over their EP group, pipeline stages summed."""
    from megatron.core import parallel_state as ps

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
    norm = global_grad_norm(model, layout)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings of rank < 2 and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=torch.cuda.is_available())
