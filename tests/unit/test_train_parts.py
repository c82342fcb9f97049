"""The training step's parts in one process (gloo world of 1, CPU, fp32).

- lr_at: hand-computed warmup / cosine / constant values (exact to 1e-12);
- build_optimizer: groups, weight decay and LR multipliers per parameter kind; set_lr;
- model_flops_per_sample equals torch's FlopCounterMode count of one forward + backward of
  the dense tiny CLIP (matmul/conv FLOPs, backward from the pooled features): exactly;
- the CLOC forward: region outputs normalised, [b, R, e], and the region loss trains the
  prompter; SigLIP bias present only when configured;
- zero-shot accuracy equals a hand computation with encode_image / encode_text;
- MetricsLogger writes one JSON object per call; moe_layer_stats reports loads that sum to 1.
"""
import json
import math

import pytest
import torch

import peers


def cfg_of(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])


def test_lr_schedule():
    from trainer.optim import lr_at

    t = cfg_of("train.lr=1.0", "train.steps=110", "train.warmup_steps=10",
               "train.min_lr_ratio=0.1").train
    assert lr_at(1, t) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(10, t) == pytest.approx(1.0, abs=1e-12)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-12)  # half way: cos = 0
    assert lr_at(110, t) == pytest.approx(0.1, abs=1e-12)
    t.lr_schedule = "constant"
    assert lr_at(5, t) == pytest.approx(0.5, abs=1e-12) and lr_at(100, t) == 1.0


def test_optimizer_groups(dist1):
    from trainer.models.build import build_for_training
    from trainer.optim import build_optimizer, set_lr

    moe = []
    for tower in ("vision", "text"):
        moe += [f"model.{tower}.moe.num_experts=4", f"model.{tower}.moe.every=2"]
    cfg = cfg_of(*moe, "train.lr_mult_experts=0.5", "train.lr_mult_routers=2.0",
                 "train.weight_decay=0.2")
    model = build_for_training(cfg, dist1)
    opt = build_optimizer(model, cfg.train)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"dense_decay", "dense_no_decay", "expert_decay", "expert_no_decay",
                           "router_decay"}
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    assert by_param[id(model.logit_scale)]["weight_decay"] == 0.0
    assert by_param[id(named["visual.ln_pre.weight"])]["name"] == "dense_no_decay"
    w1 = next(p for n, p in named.items() if n.endswith("experts.w1"))
    b1 = next(p for n, p in named.items() if n.endswith("experts.b1"))
    gate = next(p for n, p in named.items() if n.endswith("gate.wg.weight"))
    assert by_param[id(w1)]["name"] == "expert_decay" and by_param[id(w1)]["weight_decay"] == 0.2
    assert by_param[id(b1)]["name"] == "expert_no_decay"
    assert by_param[id(gate)]["name"] == "router_decay"
    set_lr(opt, 1e-3)
    assert groups["expert_decay"]["lr"] == pytest.approx(5e-4)
    assert groups["router_decay"]["lr"] == pytest.approx(2e-3)
    assert groups["dense_decay"]["lr"] == pytest.approx(1e-3)


def test_flops_formula_matches_counter(dist1):
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.metrics import model_flops_per_sample
    from trainer.models.build import build_for_training

    # unfused attention: the counter sees its matmuls; it has no formula for torch's CPU SDPA
    # kernel (same FLOPs: 2 * s^2 * d per QK^T and per PV, the formula counts them either way)
    cfg = cfg_of("model.attention=unfused")
    model = build_for_training(cfg, dist1)
    b = 4
    images, text = peers.sample_inputs(n=b)
    with FlopCounterMode(display=False) as counter:
        out = model(images, text)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    counted = counter.get_total_flops() / b
    assert model_flops_per_sample(cfg) == counted, (
        model_flops_per_sample(cfg), counted)


def test_cloc_outputs_and_region_loss_trains_prompter(dist1):
    from trainer.losses import region_text_loss
    from trainer.models.build import build_for_training

    cfg = cfg_of("model.prompter.layers=1", "train.region_loss_weight=1.0")
    model = build_for_training(cfg, dist1)
    assert not hasattr(model, "logit_bias")
    images, text = peers.sample_inputs(n=3)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]).expand(3, 2, 4)
    out = model(images, text, boxes, text[:, None].expand(3, 2, -1))
    assert out["region_features"].shape == (3, 2, cfg.model.embed_dim)
    assert out["region_text_features"].shape == (3, 2, cfg.model.embed_dim)
    assert torch.allclose(out["region_features"].norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    loss = region_text_loss(out["region_features"], out["region_text_features"], mask,
                            out["logit_scale"])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.prompter.parameters())
    siglip = build_for_training(cfg_of("train.loss=siglip", "model.logit_bias_init=-10"), dist1)
    assert float(siglip(images, text)["logit_bias"]) == -10.0


def test_zero_shot_matches_hand_computation(dist1, tmp_path):
    from trainer.data import build_tokenizer
    from trainer.data import sources
    from trainer.data.writer import write_shards
    from trainer.eval.zeroshot import zero_shot_accuracy
    from trainer.models.build import build_for_training
    from trainer.distributed.grads import wrap_ddp

    write_shards(sources.fashion_mnist("test", count=40), tmp_path, "fm", 40,
                 info={"classnames": list(sources.FASHION_MNIST_CLASSES)})
    cfg = cfg_of("model.text.vocab_size=49408", f"data.eval_urls={tmp_path}",
                 "data.batch_size=16", "data.image_size=32", "data.workers=0",
                 "data.tokenizer.context_length=16",
                 "eval.templates=['a photo of a {}', 'a {}']")
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = build_for_training(cfg, dist1)
    got = zero_shot_accuracy(wrap_ddp(model), cfg, dist1, tok)
    assert got["eval_images"] == 40
    # by hand: every image through encode_image, every prompt through encode_text
    from trainer.data import build_eval_loader
    model.eval()
    with torch.no_grad():
        names = list(sources.FASHION_MNIST_CLASSES)
        rows = []
        for n in names:
            e = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of a {n}",
                                                                     f"a {n}"])), dim=-1)
            rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        w = torch.stack(rows, 1)
        hits = total = 0
        for batch in build_eval_loader(cfg.data, tokenizer=tok):
            f = torch.nn.functional.normalize(model.encode_image(batch["images"]), dim=-1)
            hits += int(((f @ w).argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert total == 40 and got["zero_shot_top1"] == pytest.approx(hits / total, abs=1e-12)
    assert got["zero_shot_top5"] >= got["zero_shot_top1"]
    # uint8 batches normalised on the device give the same result
    cfg.data.normalize = "device"
    assert zero_shot_accuracy(wrap_ddp(model), cfg, dist1, tok) == got


def test_metrics_logger_and_moe_stats(dist1, tmp_path):
    from trainer.metrics import MetricsLogger, moe_layer_stats
    from trainer.models.build import build_for_training

    cfg = cfg_of("model.vision.moe.num_experts=4", "model.vision.moe.every=1")
    model = build_for_training(cfg, dist1)
    images, text = peers.sample_inputs(n=4)
    model(images, text)
    stats = moe_layer_stats(model, dist1)
    assert sorted(stats) == ["vision.0", "vision.1"]
    for s in stats.values():
        assert math.isclose(sum(s["load"]), 1.0, abs_tol=1e-3) and 0 <= s["dropped"] < 1
    assert moe_layer_stats(model, dist1) == {}  # popped
    logger = MetricsLogger(tmp_path, True, 10, 0, tensorboard=True, progress_bar=False)
    logger.log(1, {"loss": 2.5, "moe": stats})
    logger.log(2, {"loss": float("nan")})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["moe"]["vision.0"]["load"]
    assert any((tmp_path / "tensorboard").iterdir())


def test_activation_checkpointing_same_loss_and_grads(dist1):
    """train.activation_checkpointing recomputes the blocks in backward: same loss and
    gradients as storing activations (CPU, fp32: per-tensor relative L2 error <= 1e-6;
    the recomputed forward runs the same ops, only the summation order of grads differs)."""
    from trainer.models.build import build_for_training

    images, text = peers.sample_inputs(n=4)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_for_training(cfg_of(f"train.activation_checkpointing={recompute}"), dist1)
        out = model(images, text)
        (out["image_features"] @ out["text_features"].t()).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    rel = max(float((grads[0][k] - grads[1][k]).norm() / grads[0][k].norm().clamp_min(1e-12))
              for k in grads[0])
    assert rel <= 1e-6, rel


@pytest.mark.parametrize("moe", [False, True])
def test_region_captions_are_packed(dist1, moe):
    """Only present regions go through the text tower (rows counted with a hook), and the
    losses and gradients equal the unpacked forward's (every slot through the tower), dense
    and with a dropless MoE text tower (fp32, 1e-6)."""
    from trainer.losses import region_text_loss
    from trainer.models.build import build_for_training
    from trainer.step import region_inputs

    # no router aux loss: it averages over every routed token, so the unpacked forward's padding
    # slots (whose captions the packed one never runs) would change it
    extra = ["model.text.moe.num_experts=2", "model.text.moe.every=1",
             "model.text.moe.dispatch=dropless",
             "model.text.moe.aux.load_balance=0"] if moe else []
    cfg = cfg_of("model.prompter.layers=1", "train.region_loss_weight=1.0", *extra)
    torch.manual_seed(0)
    model = build_for_training(cfg, dist1)
    images, text = peers.sample_inputs(n=3)
    r = 4
    g = torch.Generator().manual_seed(1)
    batch = {"region_boxes": torch.rand(3, r, 2, generator=g).sort(-1).values.repeat(1, 1, 2)
             [..., [0, 2, 1, 3]],
             "region_text": text[torch.randint(0, 3, (3, r), generator=g)],
             "region_mask": torch.zeros(3, r, dtype=torch.bool)}
    batch["region_mask"][:, 1] = True                  # one present region of R per image
    rows = []
    hook = model.text.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))

    def loss_and_grads(**regions):
        model.zero_grad()
        out = model(images, text, **regions)
        loss = region_text_loss(out["region_features"], out["region_text_features"],
                                batch["region_mask"], out["logit_scale"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    packed = loss_and_grads(**region_inputs(batch))
    unpacked = loss_and_grads(region_boxes=batch["region_boxes"],
                              region_text=batch["region_text"])
    hook.remove()
    assert rows == [3 + 3, 3 + 3 * r]                  # captions + 1 region per image
    assert torch.allclose(packed[0], unpacked[0], atol=1e-6, rtol=0)
    assert packed[1].keys() == unpacked[1].keys()
    for n, grad in packed[1].items():
        assert torch.allclose(grad, unpacked[1][n], atol=1e-6, rtol=1e-5), n


def test_training_step_with_grounding_loss(dist1):
    """CLOC's grounding loss through the training step (megatron's schedule, one process):
    the step's metrics carry ``grounding_loss``, equal to the loss recomputed from a plain
    forward of the same model (fp32, 1e-6), and ``loss = contrastive + 0.5 region + 0.25
    grounding`` (1e-6); the text-prompt layers get gradient only when the weight is on; a few
    optimizer steps on one batch lower the grounding loss below 80% (measured 3.76 -> 1.91)."""
    from trainer import optim as O, step as S
    from trainer.distributed import grads as G
    from trainer.losses import grounding_loss
    from trainer.models.build import build_for_training

    cfg = cfg_of("model.prompter.layers=1", "model.prompter.grounding=true",
                 "train.region_loss_weight=0.5", "train.grounding_loss_weight=0.25",
                 "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
                 "train.lr_schedule=constant")
    torch.manual_seed(0)
    model = build_for_training(cfg, dist1)
    ddp = G.wrap_ddp(model)
    opt = O.build_optimizer(model, cfg.train)
    images, text = peers.sample_inputs(n=4)
    g = torch.Generator().manual_seed(2)
    lo = 0.5 * torch.rand(4, 2, 2, generator=g)
    batch = {"images": images, "text": text, "size": 4,
             "region_boxes": torch.cat([lo, lo + 0.2 + 0.3 * torch.rand(4, 2, 2, generator=g)], -1),
             "region_text": text[torch.tensor([[1, 2], [0, 3], [2, 1], [3, 0]])],
             "region_mask": torch.tensor([[True, True], [True, False], [True, True],
                                          [False, False]])}
    head = [p for n, p in model.named_parameters()
            if n.startswith(("prompter.text_encoder.", "prompter.box_head."))]
    assert len(head) == 6

    with torch.no_grad():
        out = model(images, text, **S.region_inputs(batch, ground=True))
    direct = float(grounding_loss(out["region_box_pred"], batch["region_boxes"],
                                  batch["region_mask"], 5.0, 2.0, 0.0))
    m = S.forward_backward(ddp, [batch], cfg)
    G.finalize_grads(ddp, dist1)
    assert abs(m["grounding_loss"] - direct) <= 1e-6, (m, direct)
    total = m["contrastive_loss"] + 0.5 * m["region_loss"] + 0.25 * m["grounding_loss"]
    assert abs(m["loss"] - total) <= 1e-6, m
    assert all(p.main_grad.abs().max() > 0 for p in head)
    history = [m["grounding_loss"]]
    for _ in range(10):
        opt.step()
        G.zero_grads(ddp, opt)
        history.append(S.forward_backward(ddp, [batch], cfg)["grounding_loss"])
        G.finalize_grads(ddp, dist1)
    print(f"grounding loss over 10 steps: {' '.join(f'{h:.3f}' for h in history)}")
    assert history[-1] < 0.8 * history[0]
    G.zero_grads(ddp, opt)

    cfg.train.grounding_loss_weight = 0.0                 # off: no box, no gradient there
    m = S.forward_backward(ddp, [batch], cfg)
    assert "grounding_loss" not in m and all(not p.main_grad.any() for p in head)
    G.zero_grads(ddp, opt)
