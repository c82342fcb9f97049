"""CLOC's region counts planned once per optimizer step (trainer/step.py ``plan_regions``), one
process (the collectives at DP=2 x EP=2 and the plan at DP=4 / TP=2 x EP=2 / PP=2 x EP=2:
tests/distributed/check_eval.py and check_moe.py):

- the planned counts equal the mask's count (region rows and the loss's normaliser);
- the region and grounding losses given the planned count are bit-identical (==) to the
  losses counting it themselves, an all-empty batch included;
- a training step (4 micro-batches, region + grounding loss) on planned micro-batches equals
  the unplanned step bit for bit (loss metrics and every gradient, ==), at both
  ``train.contrastive_scope`` values;
- host reads during ``forward_backward`` on planned micro-batches do not grow with the number
  of micro-batches (tests/host_reads.py; unplanned: one per forward, i.e. one per micro-batch,
  two at ``step`` scope);
- the Trainer plans on the host micro-batches, before their device copy.
"""
import pytest
import torch

import peers
from host_reads import HostReads

R = 3


def cfg_of(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", "train.precision=fp32",
                              "model.prompter.layers=1", "model.prompter.grounding=true",
                              "train.region_loss_weight=0.5", "train.grounding_loss_weight=0.25",
                              *overrides])


def microbatches(count, n_per=2, seed=3):
    images, text = peers.sample_inputs(n=n_per * count, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(count):
        sl = slice(i * n_per, (i + 1) * n_per)
        lo = torch.rand(n_per, R, 2, generator=g) * 0.5
        mask = torch.rand(n_per, R, generator=g) > 0.4
        mask[0, 0] = i != 1          # micro-batch 1: its first image has no first region
        out.append({"images": images[sl], "text": text[sl], "size": n_per,
                    "region_boxes": torch.cat([lo, lo + 0.1 + 0.4 * torch.rand(
                        n_per, R, 2, generator=g)], dim=-1),                # [b, R, 4]
                    "region_text": text[torch.randint(0, n_per * count, (n_per, R),
                                                      generator=g)],      # [b, R, L]
                    "region_mask": mask})
    return out


def test_plan_counts_the_masks(dist1):
    from trainer.step import plan_regions

    mbs = microbatches(4)
    plan_regions(mbs, cfg_of().train)
    for mb in mbs:
        n = int(mb["region_mask"].sum())
        assert (mb["region_rows"], mb["region_total"]) == (n, n)
        assert type(mb["region_rows"]) is int and type(mb["region_total"]) is int
    off = microbatches(2)
    plan_regions(off, cfg_of("train.region_loss_weight=0", "train.grounding_loss_weight=0",
                             "model.prompter.grounding=false").train)
    assert all("region_rows" not in mb and "region_total" not in mb for mb in off)


@pytest.mark.parametrize("valid", [[[1, 0, 1], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]]])
def test_losses_with_a_planned_count_are_bit_identical(valid):
    from trainer.losses import grounding_loss, region_text_loss

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor(valid, dtype=torch.bool)
    feats = [torch.nn.functional.normalize(torch.randn(2, R, 8, generator=g), dim=-1)
             .requires_grad_(True) for _ in range(2)]
    pred = torch.rand(2, R, 4, generator=g, requires_grad=True)
    target = torch.rand(2, R, 4, generator=g)
    scale = torch.tensor(10.0)
    n = int(mask.sum())
    for fn in (lambda **kw: region_text_loss(*feats, mask, scale, **kw),
               lambda **kw: grounding_loss(pred, target, mask, 5.0, 2.0, 0.5, **kw)):
        got, want = fn(valid_count=n), fn()
        assert torch.equal(got, want), (got, want)
        grads = [torch.autograd.grad(x, [*feats, pred], allow_unused=True) for x in (got, want)]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))


def run_step(ddp, mbs, cfg):
    from trainer.distributed.grads import unwrap
    from trainer.step import forward_backward

    ddp.zero_grad_buffer()
    torch.manual_seed(5)
    with HostReads() as reads:
        out = forward_backward(ddp, mbs, cfg)
    grads = {n: p.main_grad.detach().clone() for n, p in unwrap(ddp).named_parameters()
             if p.requires_grad}
    ddp.zero_grad_buffer()
    return out, grads, reads


@pytest.mark.parametrize("scope", ["microbatch", "step"])
def test_planned_step_equals_unplanned_and_reads_once(dist1, monkeypatch, scope):
    from trainer import step as S
    from trainer.distributed.grads import wrap_ddp
    from trainer.models.build import build_for_training

    cfg = cfg_of(f"train.contrastive_scope={scope}")
    torch.manual_seed(0)
    ddp = wrap_ddp(build_for_training(cfg, dist1))
    reads, results = {}, {}
    for planned in (True, False):
        for m in (2, 4):
            mbs = microbatches(m)
            if planned:
                S.plan_regions(mbs, cfg.train)          # as the trainer does, on the host
            else:   # forward_backward would plan: this is the self-counting path
                monkeypatch.setattr(S, "plan_regions", lambda *a: None)
            out, grads, r = run_step(ddp, mbs, cfg)
            monkeypatch.undo()
            reads[planned, m], results[planned, m] = r, (out, grads)
    for m in (2, 4):
        (po, pg), (uo, ug) = results[True, m], results[False, m]
        assert po == uo and po["grounding_loss"] > 0 and po["region_loss"] > 0, (po, uo)
        assert pg.keys() == ug.keys() and all(torch.equal(pg[k], ug[k]) for k in pg)
    # planned: no read grows with the micro-batches; unplanned: one count per forward
    assert reads[True, 4].total == reads[True, 2].total, (reads[True, 4].where,
                                                          reads[True, 2].where)
    per_mb = 2 if scope == "step" else 1
    assert reads[False, 4].total - reads[False, 2].total == 2 * per_mb, reads[False, 4].where


def test_trainer_plans_before_the_device_copy(dist1, tmp_path, monkeypatch):
    """The Trainer plans on the host micro-batches: every batch reaches ``to_device`` with
    its counts, so forward_backward never counts on the device."""
    import os

    from trainer import trainer as T
    from trainer.data import batches as D
    from trainer.distributed import read_launch_env

    synthetic = D.synthetic_microbatches

    def with_regions(cfg, layout, step):
        out = synthetic(cfg, layout, step)
        for mb, regions in zip(out, microbatches(len(out), n_per=out[0]["size"])):
            mb.update({k: v for k, v in regions.items() if k.startswith("region_")})
        return out

    seen = []

    def to_device(batch, device, cfg):
        seen.append((batch.get("region_rows"), batch.get("region_total"),
                     int(batch["region_mask"].sum())))
        return D.to_device(batch, device, cfg)

    monkeypatch.setattr(D, "synthetic_microbatches", with_regions)
    monkeypatch.setattr(T, "to_device", to_device)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cfg = cfg_of(f"run_dir={tmp_path}", "train.steps=1", "train.num_microbatches=2",
                 "train.micro_batch_size=2", "train.tensorboard=false",
                 "train.progress_bar=false", "eval.every=0")
    assert T.Trainer(cfg, read_launch_env(env), dist1).train()["exit_code"] == 0
    assert len(seen) == 2 and all(rows == total == n for rows, total, n in seen), seen
