"""Run under torchrun (2 ranks, gloo, float64): the global-batch losses vs one process.

    python -m torch.distributed.run --nproc_per_node=2 --standalone \
        tests/distributed/check_losses.py WORKDIR

Every rank builds the same global batch and the same small "towers" (linear layers, logit
scale and bias as parameters) from a shared seed, computes its local loss on its slice with
``group=WORLD``, backpropagates, and averages the parameter gradients over ranks as
data-parallel training does. It compares with the single-process loss (``group=None``) on
the whole batch: the mean over ranks of the local losses, the averaged parameter gradients,
and the local feature gradients (which must be ``world x`` the global ones, see
trainer/losses/gather.py). Writes ``result_rank{r}.json``; tests/distributed/
test_losses_dist.py states and checks the tolerances. No megatron import: starts fast.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.losses import (all_gather_with_grad, clip_loss, grounding_loss,  # noqa: E402
                            region_text_loss, siglip_loss)

D_IN, EMBED, B, R = 6, 5, 4, 3
DT = torch.float64


def towers(names, seed=0) -> dict:
    torch.manual_seed(seed)
    params = {n: torch.nn.Linear(D_IN, EMBED, dtype=DT) for n in names}
    params["logit_scale"] = torch.nn.Parameter(torch.tensor(2.0, dtype=DT))  # t' (exp'd below)
    params["logit_bias"] = torch.nn.Parameter(torch.tensor(-3.0, dtype=DT))
    return params


def parameters(params: dict) -> list[torch.Tensor]:
    return [p for v in params.values() for p in ([v] if isinstance(v, torch.Tensor)
                                                  else v.parameters())]


def compare(name: str, loss_fn, raw: dict, extra=None) -> dict:
    """``raw``: tower name -> global input ``[world*B, ...]``; ``loss_fn(features, params,
    extra, group)`` with ``extra`` (e.g. the region mask, or a dict of such tensors) sliced
    like the inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * B, (rank + 1) * B)

    def run(take, group):
        params = towers(raw)
        feats = {n: F.normalize(params[n](take(x)), dim=-1) for n, x in raw.items()}
        for f in feats.values():
            f.retain_grad()
        part = (None if extra is None else take(extra) if torch.is_tensor(extra)
                else {k: take(v) for k, v in extra.items()})
        loss = loss_fn(feats, params, part, group)
        loss.backward()
        for p in parameters(params):   # e.g. the bias, unused by clip_loss
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return loss.detach(), parameters(params), {n: f.grad for n, f in feats.items()}

    ref_loss, ref_params, ref_feats = run(lambda x: x, None)
    loss, params, feats = run(lambda x: x[mine], dist.group.WORLD)
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    for p in params:   # the data-parallel gradient sync: average over ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    return {
        f"{name}_loss": float(ref_loss),
        f"{name}_loss_err": abs(float(mean_loss - ref_loss)),
        f"{name}_param_grad_err": max(float((p.grad - q.grad).abs().max())
                                      for p, q in zip(params, ref_params)),
        f"{name}_param_grad_max": max(float(q.grad.abs().max()) for q in ref_params),
        f"{name}_feature_grad_err": max(float((feats[n] - world * ref_feats[n][mine]).abs().max())
                                        for n in raw),
    }


def region_masks(valid_per_rank: list[int], g) -> torch.Tensor:
    """``[world*B, R]`` masks: rank r's slice has valid_per_rank[r] valid slots, scattered."""
    masks = []
    for n in valid_per_rank:
        m = torch.zeros(B * R, dtype=torch.bool)
        m[torch.randperm(B * R, generator=g)[:n]] = True
        masks.append(m.view(B, R))
    return torch.cat(masks)


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234)   # the shared seed: every rank draws the same batch
    pairs = {"image": torch.randn(world * B, D_IN, generator=g, dtype=DT),
             "text": torch.randn(world * B, D_IN, generator=g, dtype=DT)}
    regions = {"region": torch.randn(world * B, R, D_IN, generator=g, dtype=DT),
               "region_text": torch.randn(world * B, R, D_IN, generator=g, dtype=DT)}
    result = {"world": world}

    result.update(compare("clip", lambda f, p, _, grp: clip_loss(
        f["image"], f["text"], p["logit_scale"].exp(), group=grp), pairs))
    result.update(compare("siglip", lambda f, p, _, grp: siglip_loss(
        f["image"], f["text"], p["logit_scale"].exp(), p["logit_bias"], group=grp), pairs))

    def region(f, p, mask, grp):
        return region_text_loss(f["region"], f["region_text"], mask, p["logit_scale"].exp(),
                                group=grp)

    # unequal counts; a rank with no valid region; nothing valid anywhere
    cases = {"region_uneven": [7, 2], "region_one_empty": [5, 0], "region_all_empty": [0, 0]}
    for name, counts in cases.items():
        counts = (counts + [3] * world)[:world]
        result.update(compare(name, region, regions, region_masks(counts, g)))

    # repeated region captions, across ranks too: not each other's negatives (ids gathered)
    ids = torch.randint(0, 3, (world * B, R, 2), generator=g)   # 9 captions for 24 slots
    def region_dedupe(f, p, x, grp):
        return region_text_loss(f["region"], f["region_text"], x["mask"],
                                p["logit_scale"].exp(), group=grp, region_text_ids=x["ids"])
    mask = region_masks(([7, 4] + [3] * world)[:world], g)
    result.update(compare("region_dedupe", region_dedupe, regions, {"mask": mask, "ids": ids}))
    result["region_dedupe_plain_loss"] = compare("plain", region, regions, mask)["plain_loss"]

    # CLOC's grounding loss: boxes from a "tower", a global mean over uneven valid counts
    lo = 0.6 * torch.rand(world * B, R, 2, generator=g, dtype=DT)
    target = torch.cat([lo, lo + 0.1 + 0.3 * torch.rand(world * B, R, 2, generator=g,
                                                          dtype=DT)], -1)

    def grounding(f, p, x, grp):
        c = torch.sigmoid(f["box"][..., :4])                      # cx, cy, w, h
        pred = torch.cat([c[..., :2] - c[..., 2:] / 2, c[..., :2] + c[..., 2:] / 2], -1)
        return grounding_loss(pred, x["target"], x["mask"], 5.0, 2.0, 1.0, group=grp)
    result.update(compare("grounding", grounding, {"box": regions["region"]},
                          {"mask": region_masks(([9, 2] + [3] * world)[:world], g),
                           "target": target}))

    # the gather alone: rank r's loss sum(gathered * c_r) gives rank s the grad sum_r c_r[s]
    coeffs = torch.randn(world, world * B, EMBED, generator=g, dtype=DT)
    x_all = torch.randn(world, B, EMBED, generator=g, dtype=DT)
    x = x_all[rank].clone().requires_grad_()
    gathered = all_gather_with_grad(x, dist.group.WORLD)                  # [world*B, EMBED]
    (gathered * coeffs[rank]).sum().backward()
    expected = coeffs.sum(0)[rank * B:(rank + 1) * B]
    result["gather_forward_ok"] = bool(torch.equal(gathered.detach(), x_all.flatten(0, 1)))
    result["gather_grad_err"] = float((x.grad - expected).abs().max())

    # unequal shapes: a clear error on every rank, not a hang
    try:
        all_gather_with_grad(torch.zeros(B + rank, EMBED, dtype=DT), dist.group.WORLD)
        result["shape_error"] = ""
    except ValueError as e:
        result["shape_error"] = str(e)

    (out_dir / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
