"""Contrastive negatives across the whole optimizer step (``train.contrastive_scope: step``).

With ``microbatch`` scope (trainer/step.py) each micro-batch's contrastive loss sees the
micro-batch of every data-parallel rank; gradient accumulation and pipeline micro-batches add
no negatives. ``step`` scope computes the losses over every micro-batch of the step on every
DP rank at once by feature caching in two passes (GradCache, Gao et al. 2021; open_clip's
``accum_freq``):

1. every micro-batch forward without grad through the schedule (``forward_only``); the last
   pipeline stage keeps the model outputs (features, logit scale / bias);
2. the loss (trainer.step.compute_loss: CLIP or SigLIP, and CLOC's region loss) over the
   concatenated outputs of the step, gathered over DP as usual, backward to the cached
   outputs only: their gradients;
3. every micro-batch forward again with grad and backward of ``<output, cached gradient>``
   (the logit scale and bias terms once, with micro-batch 0), which puts ``dL/dtheta`` of
   the step loss in the parameters' gradients.

The result equals one micro-batch holding all the step's samples (tests/distributed/
check_parallel.py: 4 micro-batches vs one of 4x the size, 2 DP ranks and PP=2). It works at
any PP: both passes run megatron-core's schedule, whose loss function is called on the last
stage only. Randomness is replayed: each micro-batch's second forward starts from the state of
every generator (trainer/distributed/rng.py: Python, NumPy, torch CPU and CUDA, megatron's
tracker) its first forward started from, so noisy gating draws the same noise. MoE router aux
losses ride on the second pass's layer outputs only (the first runs without grad), one per
micro-batch as in ``microbatch`` scope, and the routing statistics count the second pass only.
Cost: one extra forward per micro-batch (as activation checkpointing) and the step's features
in memory.
"""
from __future__ import annotations

import functools

import torch

from trainer.config import Config
from trainer.distributed import rng
from trainer.distributed.grads import unwrap
from trainer.step import compute_loss, forward_step, route_labels

_SKIP_BATCH_KEYS = ("images",)  # the loss never reads the pixels: not concatenated


# ---- the step loss over cached outputs -----------------------------------------------------

def _concat(parts: list[dict], skip: tuple[str, ...] = ()) -> dict:
    """Per micro-batch dicts -> one: tensors with a batch dim concatenated, 0-dim tensors and
    anything else from micro-batch 0."""
    out = {}
    for k, v in parts[0].items():
        if k in skip:
            continue
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = torch.cat([p[k] for p in parts])
        else:
            out[k] = v
    return out


def step_loss_grads(outputs: list[dict], microbatches: list[dict], cfg: Config
                    ) -> tuple[list[dict], dict]:
    """The loss over all cached ``outputs`` (one dict per micro-batch, no grad) -> (per
    micro-batch {output key: d loss / d output}, metrics). Collective over DP (the gather)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in _concat(outputs).items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    batch = _concat(microbatches, _SKIP_BATCH_KEYS)
    if "region_total" in batch:  # planned per micro-batch (trainer.step.plan_regions): the step's
        batch["region_total"] = sum(mb["region_total"] for mb in microbatches)
    with torch.enable_grad():
        loss, metrics = compute_loss(leaves, batch, cfg.train)
        loss.backward()
    sizes = [o[next(k for k, v in leaves.items() if v.dim())].shape[0] for o in outputs]
    grads: list[dict] = [{} for _ in outputs]
    for k, leaf in leaves.items():
        if leaf.grad is None:  # an output the loss does not use
            continue
        if leaf.dim() == 0:
            grads[0][k] = leaf.grad                  # the logit scale / bias: counted once
        else:
            for g, part in zip(grads, leaf.grad.split(sizes)):
                g[k] = part
    return grads, {k: float(v) for k, v in metrics.items()}


def _surrogate(out: dict, grads: dict, num_microbatches: int):
    """``<output, cached gradient>`` summed over the outputs; x num_microbatches because the
    schedule divides each micro-batch's loss by their number."""
    total = sum((out[k].float() * g.float()).sum() for k, g in grads.items())
    if not grads:  # nothing to backpropagate from this micro-batch (kept in the graph)
        total = out["logit_scale"] * 0.0
    return total * num_microbatches, {}


# ---- the two passes ------------------------------------------------------------------------

def step_forward_backward(model: torch.nn.Module, microbatches: list[dict], cfg: Config,
                          run_schedule) -> dict | None:
    """Forward and backward of one optimizer step with step-scope contrastive losses.
    ``run_schedule(forward_step_func, forward_only)`` runs megatron-core's schedule over
    ``microbatches``. Returns the step's loss metrics on the last stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from trainer.moe.layer import moe_mlps

    m = len(microbatches)
    last = ps.is_pipeline_last_stage()
    starts, outputs = [], []

    def cache(output):
        outputs.append({k: v.detach() if isinstance(v, torch.Tensor) else v
                        for k, v in output.items()})
        return torch.zeros(()), {}

    def first(data_iterator, model):
        starts.append(rng.snapshot())
        output, _ = forward_step(data_iterator, model, cfg.train)
        return output, cache

    layers = moe_mlps(unwrap(model))
    stats = [mlp.pop_stats() for mlp in layers]     # the statistics so far: kept
    with torch.no_grad():
        run_schedule(first, True)
    for mlp, kept in zip(layers, stats):            # the first pass's routing: not counted
        mlp.pop_stats()
        mlp.stats = kept
    after = rng.snapshot()

    grads, metrics = step_loss_grads(outputs, microbatches, cfg) if last else (None, None)
    outputs.clear()
    done = []

    def second(data_iterator, model):
        i = len(done)
        done.append(i)
        rng.restore(starts[i])
        output, _ = forward_step(data_iterator, model, cfg.train)
        return output, (functools.partial(_surrogate, grads=grads[i], num_microbatches=m)
                        if last else None)

    try:
        run_schedule(second, False)
    finally:
        rng.restore(after)
        route_labels(model, None)
    return metrics
