"""Mobile V-MoE's super-class guided router loss (model.vision.moe.aux.superclass) on CPU.

- ``superclass_loss`` equals a python-float cross-entropy over the labelled units (abs diff
  <= 1e-12 in float64; measured ~1e-16); no labelled unit gives exactly 0;
- inside the tiny CLIP (image routing, one MoE block): the recorded loss equals the direct
  cross-entropy of the captured class tokens through the router weights, mapped through
  ``superclass_map`` (<= 1e-6: the layer works in float32); its gradient on the router equals
  autograd of that float64 computation times the weight (<= 1e-6 * max(1, max |grad|)), and
  every other parameter gets exactly zero gradient (the loss trains the router alone);
- the training step hands the labels to the layer and clears them after the step;
- config errors name the field.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import peers

MAP = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]   # 10 classes -> 4 experts


@pytest.fixture(autouse=True)
def _aux_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield


def _cfg(*overrides):
    from trainer.config import load_config

    moe = {"num_experts": 4, "layers": "[1]", "routing": "image", "top_k": 1,
           "router_init_std": 0.5, "superclass_map": json.dumps(MAP), "aux.load_balance": 0.0,
           "aux.superclass": 0.7}
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}",
                              *[f"model.vision.moe.{k}={v}" for k, v in moe.items()],
                              *overrides])


def test_superclass_loss_equals_direct_cross_entropy():
    from trainer.moe.routing import superclass_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([2, -1, 0, 3, -1, 1])
    rows = logits.tolist()
    ce = [math.log(sum(math.exp(v) for v in r)) - r[t]
          for r, t in zip(rows, targets.tolist()) if t >= 0]
    assert abs(float(superclass_loss(logits, targets)) - sum(ce) / len(ce)) <= 1e-12
    assert float(superclass_loss(logits, torch.full((6,), -1))) == 0.0


def test_gradient_reaches_only_the_router(dist1):
    from trainer import step as S
    from trainer.models import build as B
    from trainer.moe.layer import moe_mlps

    cfg = _cfg()
    torch.manual_seed(5)
    model = B.build_for_training(cfg, dist1).train()
    (mlp,) = moe_mlps(model)
    captured = []
    mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    images, text = peers.sample_inputs(n=6, seed=2)
    labels = torch.tensor([3, 7, -1, 12, 0, 9])   # -1: no label; 12: outside the map
    S.route_labels(model, labels)
    out = model(images, text)
    (0.0 * (out["image_features"].sum() + out["text_features"].sum())).backward()
    S.route_labels(model, None)

    x = captured[0][0].double()                   # [b, d]: the class tokens routed
    wg = mlp.router.wg.weight.detach().double().requires_grad_(True)
    logits = x @ wg.t()
    keep = [i for i, c in enumerate(labels.tolist()) if 0 <= c < len(MAP)]
    target = torch.tensor([MAP[labels[i]] for i in keep])
    direct = torch.nn.functional.cross_entropy(logits[keep], target)
    (0.7 * direct).backward()
    stats = mlp.pop_stats()
    assert abs(float(stats["aux_superclass"]) - float(direct)) <= 1e-6
    got = mlp.router.wg.weight.grad.double()
    tol = 1e-6 * max(1.0, float(wg.grad.abs().max()))
    assert float(got.abs().max()) > 0 and float((got - wg.grad).abs().max()) <= tol
    for name, p in model.named_parameters():
        if p is not mlp.router.wg.weight:
            assert p.grad is None or not p.grad.any(), name


def test_training_step_passes_and_clears_labels(dist1):
    from trainer import optim as O, step as S
    from trainer.distributed import grads as G
    from trainer.models import build as B
    from trainer.moe.layer import moe_mlps
    from trainer.data.batches import synthetic_microbatches

    cfg = _cfg("train.micro_batch_size=4")
    model = B.build_for_training(cfg, dist1)
    ddp = G.wrap_ddp(model)
    (mlp,) = moe_mlps(model)
    batch = synthetic_microbatches(cfg, dist1, 1)[0]
    S.forward_backward(ddp, [dict(batch, labels=torch.tensor([0, 1, 5, 9]))], cfg)
    assert mlp.class_labels is None                        # cleared for evaluation forwards
    assert float(mlp.pop_stats()["aux_superclass"]) > 0
    S.forward_backward(ddp, [batch], cfg)                  # no labels: no super-class loss
    assert "aux_superclass" not in mlp.pop_stats()
    G.zero_grads(ddp, O.build_optimizer(model, cfg.train))


def test_superclass_config_errors_name_the_field(tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="model.vision.moe.aux.superclass=0.7 needs "
                                          "routing='image'"):
        _cfg("model.vision.moe.routing=token")
    with pytest.raises(ConfigError, match="model.vision.moe.superclass_map='nothing.json': "
                                          "no such file"):
        _cfg("model.vision.moe.superclass_map=nothing.json")
    with pytest.raises(ConfigError, match=r"model.vision.moe.superclass_map=\[0, 4\]"):
        _cfg("model.vision.moe.superclass_map=[0,4]")
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"superclass_of_class": MAP, "classnames": list("abcdefghij")}))
    assert _cfg(f"model.vision.moe.superclass_map={f}").model.vision.moe.superclasses() == MAP
    with pytest.raises(ConfigError, match="activation_checkpointing at parallel.pp=2"):
        _cfg("parallel.pp=2", "train.activation_checkpointing=true")
