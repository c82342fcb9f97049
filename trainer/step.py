"""The forward and backward of one optimizer step: microbatches through megatron-core's
schedule, the loss on the last pipeline stage.

    model = build_for_training(cfg, layout)   # trainer/models/build.py
    ddp = wrap_ddp(model)                     # trainer/distributed/grads.py
    opt = build_optimizer(model, cfg.train)   # trainer/optim.py
    plan_regions(host_microbatches, cfg.train)  # CLOC: region counts, one collective per step
    metrics = forward_backward(ddp, to_device(host_microbatches), cfg)
    finalize_grads(ddp, layout)               # DP / expert-DP reduce, routers over TP
    norm = clip_grads(ddp, layout, cfg.train.grad_clip)
    set_lr(opt, lr_at(step, cfg.train)); opt.step(); zero_grads(ddp, opt)

The schedule is ``get_forward_backward_func()``: no pipelining at pp=1, 1F1B otherwise. Only
the last stage computes the loss. ``train.contrastive_scope``: ``microbatch`` computes the
contrastive losses per micro-batch (negatives: the micro-batch of every DP rank); ``step``
over all the step's micro-batches at once (trainer/step_cache.py: two passes, cached features).
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.distributed as dist

from trainer.config import Config, TrainConfig
from trainer.distributed.collectives import (all_gather_ints, expert_group_ranks, group_ranks,
                                             max_over_expert_group)
from trainer.distributed.grads import unwrap
from trainer.losses import clip_loss, grounding_loss, region_text_loss, siglip_loss


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
    plus ``region_loss_weight`` x the CLOC region-text loss plus ``grounding_loss_weight`` x
    the CLOC grounding loss (CLOC's Eq. 4 has one lambda for both: set the two weights equal
    to follow it). Router aux losses ride on the MoE layer outputs (trainer/moe/layer.py)."""
    group = contrastive_group(cfg)
    img, txt, scale = out["image_features"].float(), out["text_features"].float(), out["logit_scale"]
    if cfg.loss == "siglip":
        loss = siglip_loss(img, txt, scale, out["logit_bias"], group=group)
    else:
        loss = clip_loss(img, txt, scale, group=group)
    metrics = {"contrastive_loss": loss.detach().clone()}
    if "region_features" in out and cfg.region_loss_weight > 0:  # grounding alone: not needed
        region = region_text_loss(out["region_features"].float(),
                                  out["region_text_features"].float(),
                                  batch["region_mask"], scale, group=group,
                                  region_text_ids=(batch["region_text"]
                                                   if cfg.region_dedupe_captions else None),
                                  valid_count=batch.get("region_total"))
        metrics["region_loss"] = region.detach().clone()
        loss = loss + cfg.region_loss_weight * region
    if "region_box_pred" in out:
        ground = grounding_loss(out["region_box_pred"], batch["region_boxes"],
                                batch["region_mask"], cfg.grounding_l1_weight,
                                cfg.grounding_giou_weight, cfg.grounding_l2_weight, group=group,
                                valid_count=batch.get("region_total"))
        metrics["grounding_loss"] = ground.detach().clone()
        loss = loss + cfg.grounding_loss_weight * ground
    # a copy: the schedule divides the returned loss by num_microbatches in place
    metrics["loss"] = loss.detach().clone()
    return loss, metrics


def route_labels(model: torch.nn.Module, labels: torch.Tensor | None) -> None:
    """Hands the microbatch's class labels to the super-class guided MoE layers (Mobile V-MoE,
    trainer/moe/layer.py); None clears them."""
    for m in unwrap(model).modules():
        if getattr(m, "uses_class_labels", False):
            m.class_labels = labels


def uses_regions(batch: dict, cfg: TrainConfig) -> bool:
    """Whether the training forward runs CLOC's region tasks on ``batch``."""
    return ((cfg.region_loss_weight > 0 or cfg.grounding_loss_weight > 0)
            and "region_boxes" in batch)


def plan_regions(microbatches: list[dict], cfg: TrainConfig) -> None:
    """Collective over the world, once per optimizer step (every rank, the same number of
    micro-batches; none when neither group spans ranks). Adds to each micro-batch with
    regions two plain ints:

    - ``region_rows``: the largest count of present regions of the micro-batch over this
      rank's expert-parallel group (the region-caption rows its text tower runs, region_inputs);
    - ``region_total``: the present regions summed over the group the region and grounding
      losses normalise over (``contrastive_group``: the data-parallel group, or this rank).

    Call it on the host batches, before they move to the device: the counts are then read
    from CPU masks (no device sync), and ONE all-gather over the world of each rank's
    per-micro-batch counts (``[world, m]`` int64) gives both, each rank reducing over the
    members of its two groups (EP and DP differ: EP lies inside TP x DP, so one all-reduce
    cannot serve both). Without a plan, region_inputs and the losses compute the same numbers
    per micro-batch (a host read, an EP all-reduce and a DP all-reduce each time; the eval
    loop, trainer/eval/embed.py, gathers its own ``region_rows`` with its lockstep flag)."""
    if not microbatches or not uses_regions(microbatches[0], cfg):
        return
    local = torch.stack([mb["region_mask"].sum() for mb in microbatches]).tolist()   # [m]
    ep, dp = expert_group_ranks(), group_ranks(contrastive_group(cfg))
    if len(ep) == len(dp) == 1:   # the same on every rank: nothing to exchange
        every = {ep[0]: local}
    else:
        every = all_gather_ints(local)                                              # [world][m]
    for i, mb in enumerate(microbatches):
        mb["region_rows"] = max(every[r][i] for r in ep)
        mb["region_total"] = sum(every[r][i] for r in dp)


def region_inputs(batch: dict, ground: bool = False) -> dict:
    """The model's region arguments for a batch with regions: boxes, captions, the mask of
    the present regions, and how many region-caption rows the text tower runs (packed: the
    present regions only, padded to the largest count of the expert-parallel group, whose
    all-to-alls need equal shapes); ``ground``: also the boxes the region captions locate
    (CLOC's grounding task). The row count is the batch's ``region_rows`` when planned
    (plan_regions), else one host read of the count and an all-reduce over EP."""
    mask = batch["region_mask"]
    rows = batch.get("region_rows")
    if rows is None:
        rows = max_over_expert_group(int(mask.sum()))
    return {"region_boxes": batch["region_boxes"], "region_text": batch["region_text"],
            "region_mask": mask, "region_rows": rows, "ground": ground}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, cfg: TrainConfig):
    batch = next(data_iterator)
    route_labels(model, batch.get("labels"))
    ground = cfg.grounding_loss_weight > 0
    regions = uses_regions(batch, cfg)
    # no autocast: the parameters' dtype (train.precision, trainer/distributed/device.py)
    # is the compute dtype, as in megatron; the losses run in fp32
    output = model(batch.get("images"), batch.get("text"),
                   **(region_inputs(batch, ground) if regions else {}))
    return output, functools.partial(compute_loss, batch=batch, cfg=cfg)


def _batch_size(mb: dict) -> int:
    return mb["size"] if "size" in mb else mb["text"].shape[0]


def forward_backward(model: torch.nn.Module, microbatches: list[dict], cfg: Config,
                     forward_only: bool = False) -> dict | None:
    """Runs every microbatch forward (and backward); the schedule divides each microbatch
    loss by their number (``contrastive_scope: step``: one loss over the step,
    trainer/step_cache.py). Returns the metrics averaged over microbatches on the last stage
    (``loss``, ``contrastive_loss``, ``region_loss``, ``grounding_loss``), None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def run_schedule(forward_step_func, forward_only: bool):
        return get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=iter(microbatches),
            model=[model], num_microbatches=len(microbatches),
            seq_length=cfg.model.vision.seq_length,
            micro_batch_size=_batch_size(microbatches[0]), forward_only=forward_only)

    # MoE aux losses ride on the layer outputs; their gradient is scaled like the main loss
    # (which the schedule divides by the number of microbatches).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(microbatches)))
    if uses_regions(microbatches[0], cfg.train) and "region_rows" not in microbatches[0]:
        # not planned by the caller (the trainer plans on the host batches)
        microbatches = [dict(mb) for mb in microbatches]   # the caller's dicts stay as given
        plan_regions(microbatches, cfg.train)
    if cfg.train.contrastive_scope == "step" and not forward_only:
        from trainer.step_cache import step_forward_backward
        return step_forward_backward(model, microbatches, cfg, run_schedule)
    try:
        losses = run_schedule(functools.partial(forward_step, cfg=cfg.train), forward_only)
    finally:
        route_labels(model, None)  # evaluation forwards carry no labels
    if not losses:
        return None
    return {k: float(torch.stack([d[k] for d in losses]).mean()) for k in losses[0]}
