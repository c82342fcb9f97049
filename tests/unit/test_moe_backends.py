"""Which kernels backend runs the MoE experts in training, and host reads per step (CPU, one
process, the ``dist1`` world).

- Host reads (tests/host_reads.py: ``aten._local_scalar_dense`` + ``Tensor.tolist/item/numpy``)
  during one training step's forward_backward + finalize_grads + clip_grads of a tiny bf16 MoE
  CLIP (every block MoE in both towers, E=4, top-2; capacity and dropless dispatch, EP=1) are
  the same at L and 2L blocks per tower, and none comes from trainer/moe/ or kernels/
  (measured before this change: 19 at L=2, 35 at L=4, 4 per MoE layer from the two
  ``F.one_hot`` of trainer/moe/routing.py; now 3 at both: two in trainer/step.py, the
  microbatch loss metrics, one in the global grad norm). The optimizer step is left out: CPU
  AdamW reads its step counters.
- ``model.<tower>.moe.expert_backend`` reaches every MoE layer of that tower; each layer logs
  its backend once.
- A bf16 MoE run through the Trainer reports ``moe/backend_calls`` with 0 reference calls.
"""
import json
import logging

import pytest
import torch

import kernels
from host_reads import HostReads

MOE = ["model.text.vocab_size=1000", "train.micro_batch_size=4", "train.precision=bf16"]


def moe_overrides(layers: int, dispatch: str) -> list[str]:
    out = list(MOE)
    for tower in ("vision", "text"):
        out += [f"model.{tower}.layers={layers}", f"model.{tower}.moe.num_experts=4",
                f"model.{tower}.moe.every=1", f"model.{tower}.moe.dispatch={dispatch}"]
    return out


def build(layout, overrides):
    from trainer.config import load_config
    from trainer.distributed.grads import wrap_ddp
    from trainer.models.build import build_for_training
    from trainer.optim import build_optimizer

    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_for_training(cfg, layout)
    ddp = wrap_ddp(model)
    return cfg, model, ddp, build_optimizer(model, cfg.train)


def step_reads(layout, overrides):
    """Host reads and expert calls of one step (forward_backward, finalize, clip) after a
    warm-up step."""
    from trainer.data.batches import synthetic_microbatches
    from trainer.distributed.grads import clip_grads, finalize_grads, zero_grads
    from trainer.step import forward_backward

    cfg, model, ddp, opt = build(layout, overrides)
    mb = synthetic_microbatches(cfg, layout, 1)
    forward_backward(ddp, mb, cfg)
    finalize_grads(ddp, layout)
    clip_grads(ddp, layout, 1.0)
    opt.step()
    zero_grads(ddp, opt)
    before = kernels.BACKEND_CALLS.copy()
    with HostReads() as reads:
        forward_backward(ddp, mb, cfg)
        finalize_grads(ddp, layout)
        clip_grads(ddp, layout, 1.0)
    return reads, dict(kernels.BACKEND_CALLS - before)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_host_reads_per_step_do_not_grow_with_layers(dist1, dispatch):
    got = {}
    for layers in (1, 2):
        reads, calls = step_reads(dist1, moe_overrides(layers, dispatch))
        ours = {k: v for k, v in reads.where.items()
                if k.startswith(("trainer/moe/", "kernels/"))}
        assert not ours, (layers, reads.where)
        # one expert_mlp call per MoE layer (2 towers x layers), all on torch's grouped mm
        assert calls == {("expert_mlp", "torch"): 2 * layers}, calls
        got[layers] = (reads.total, reads.where)
    assert got[1][0] == got[2][0], got
    print(dispatch, got)


def test_expert_backend_per_tower_and_logged_once(dist1, caplog):
    from trainer.data.batches import synthetic_microbatches
    from trainer.moe.layer import moe_mlps
    from trainer.step import forward_backward

    overrides = moe_overrides(2, "capacity") + ["model.vision.moe.expert_backend=reference",
                                                 "model.text.moe.expert_backend=torch"]
    cfg, model, ddp, _ = build(dist1, overrides)
    layers = moe_mlps(model)
    assert [m.experts.backend for m in layers] == ["reference"] * 2 + ["torch"] * 2
    before = kernels.BACKEND_CALLS.copy()
    with caplog.at_level(logging.INFO, logger="upclip"):
        for s in (1, 2):
            forward_backward(ddp, synthetic_microbatches(cfg, dist1, s), cfg)
    assert dict(kernels.BACKEND_CALLS - before) == {("expert_mlp", "reference"): 4,
                                                   ("expert_mlp", "torch"): 4}
    lines = [r.getMessage() for r in caplog.records if "served by" in r.getMessage()]
    assert sorted(lines) == sorted(
        [f"MoE vision.{i}: experts (4 local, bfloat16) served by the reference backend "
         f"(expert_backend=reference)" for i in (0, 1)]
        + [f"MoE text.{i}: experts (4 local, bfloat16) served by the torch backend "
           f"(expert_backend=torch)" for i in (0, 1)]), lines
    assert [m.experts.served_first for m in layers] == ["reference"] * 2 + ["torch"] * 2


def test_bf16_moe_run_reports_no_reference_calls(dist1, tmp_path):
    from trainer.config import load_config
    from trainer.distributed import read_launch_env
    from trainer.trainer import Trainer

    import os
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cfg = load_config(None, moe_overrides(2, "dropless") + [
        f"run_dir={tmp_path}", "train.steps=2", "train.log_every=1", "train.tensorboard=false",
        "train.progress_bar=false", "model.vision.moe.dispatch=capacity"])
    result = Trainer(cfg, read_launch_env(env), dist1).train()
    assert result["exit_code"] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    calls = [r["moe/backend_calls"] for r in records if "moe/backend_calls" in r]
    # per logged step: 4 MoE layers x 1 microbatch, all served by torch's grouped mm
    assert calls == [{"cuda": 0, "torch": 4, "reference": 0}] * 2, calls
