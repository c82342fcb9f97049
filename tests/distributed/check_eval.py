"""Run under torchrun (2 ranks, gloo): evaluation of an MoE CLIP at DP=2 x EP=2.

    torchrun --nproc_per_node=2 tests/distributed/check_eval.py WORKDIR

Rank 0 writes 40 real Fashion-MNIST test images with their CLOC box into 3 shards of 16, 16
and 8 samples (rank 0 reads shards 0 and 2: 24 samples, 2 batches of 16; rank 1 reads shard
1: 16 samples, 1 batch, then one padding batch to keep the MoE all-to-alls in lockstep). A
tiny CLIP with MoE blocks in both towers (E=4, top-2, EP=2, eval capacity factor 4: no token
dropped, so routing does not depend on which samples share a batch) and a region prompter is
evaluated with ``trainer.eval.evaluate`` (zero-shot, retrieval, regions) and saved. Rank 0
writes ``dp2.json``; tests/distributed/test_eval_dist.py then evaluates the checkpoint with
tools/evaluate.py in one process (DP=1, EP=1) and compares.

Then CLOC's region plan at DP=2 x EP=2 (trainer/step.py ``plan_regions``), on a fresh model of
the same shape with a grounding head, 4 micro-batches whose region masks differ per rank:
the planned counts equal the per-micro-batch computation they replace (max over EP of the
mask's count, sum over DP); a training step on planned micro-batches equals the unplanned one
bit for bit at both contrastive scopes; the collectives and host reads of each are counted
(tests/collective_calls.py, tests/host_reads.py). Every rank writes ``plan_rank{r}.json``.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collective_calls import CollectiveCalls  # noqa: E402
from host_reads import HostReads  # noqa: E402
from trainer import checkpoint, step as S  # noqa: E402
from trainer.models import build as B  # noqa: E402
from trainer.distributed import grads as G  # noqa: E402
from trainer.config import config_to_dict, load_config  # noqa: E402
from trainer.distributed import ParallelLayout, init_distributed, read_launch_env  # noqa: E402


def overrides(shards: Path) -> list[str]:
    over = [f"data.eval_urls={shards}", "data.image_size=32", "data.workers=0",
            "data.batch_size=16", "data.max_regions=1", "data.tokenizer.context_length=16",
            "model.prompter.layers=1", "parallel.ep=2"]
    for tower in ("vision", "text"):
        m = f"model.{tower}.moe."
        over += [m + "num_experts=4", m + "every=2", m + "top_k=2", m + "router_init=normal",
                 m + "router_init_std=0.5", m + "capacity_factor=4.0",
                 m + "eval_capacity_factor=4.0"]
    return over


M, R = 4, 2   # the region plan's micro-batches and region slots


def region_microbatches(cfg, layout) -> list[dict]:
    """``M`` micro-batches with ``R`` region slots; masks, boxes and captions differ per rank."""
    from trainer.data.batches import synthetic_microbatches

    g = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    out = []
    for i, mb in enumerate(synthetic_microbatches(cfg, layout, step=0)[:M]):
        b = mb["size"]
        lo = torch.rand(b, R, 2, generator=g) * 0.5
        mask = torch.rand(b, R, generator=g) > 0.5
        mask[0, 0] = True                                   # >= 1 region per micro-batch
        out.append({**mb, "region_boxes": torch.cat([lo, lo + 0.1 + 0.4 * torch.rand(
                        b, R, 2, generator=g)], dim=-1),                     # [b, R, 4]
                    "region_text": mb["text"][torch.randint(0, b, (b, R), generator=g)],
                    "region_mask": mask})
    return out


def region_plan_case(shards: Path, world: int) -> dict:
    from trainer.distributed.collectives import max_over_expert_group
    from trainer.losses.gather import sum_over_group

    cfg = load_config(None, overrides(shards) + [
        "model.prompter.grounding=true", "train.region_loss_weight=0.5",
        "train.grounding_loss_weight=0.25", f"train.num_microbatches={M}",
        "data.batch_size=4"])
    layout = ParallelLayout(world, ep=2).initialize(seed=1)
    out = {}
    # the plan vs the per-micro-batch numbers it replaces, global contrastive on and off
    for gc in (True, False):
        cfg.train.global_contrastive = gc
        mbs = region_microbatches(cfg, layout)
        with CollectiveCalls() as calls, HostReads() as reads:
            S.plan_regions(mbs, cfg.train)
        group = S.contrastive_group(cfg.train)
        old = [(max_over_expert_group(int(mb["region_mask"].sum())),
                int(sum_over_group(mb["region_mask"].sum(), group))) for mb in mbs]
        out[f"plan_gc{int(gc)}"] = [(mb["region_rows"], mb["region_total"]) for mb in mbs]
        out[f"old_gc{int(gc)}"] = old
        out[f"plan_gc{int(gc)}_collectives"] = calls.total
        out[f"plan_gc{int(gc)}_host_reads"] = reads.total
    out["local_counts"] = [int(mb["region_mask"].sum()) for mb in mbs]
    # a training step planned vs unplanned (forward_backward's own plan switched off)
    cfg.train.global_contrastive = True
    torch.manual_seed(0)
    ddp = G.wrap_ddp(B.build_for_training(cfg, layout))
    plan = S.plan_regions
    for scope in ("microbatch", "step"):
        cfg.train.contrastive_scope = scope
        runs = {}
        for planned in (True, False):
            mbs = region_microbatches(cfg, layout)
            if planned:
                plan(mbs, cfg.train)
            S.plan_regions = plan if planned else (lambda *a: None)
            ddp.zero_grad_buffer()
            torch.manual_seed(5)
            try:
                with CollectiveCalls() as calls, HostReads() as reads:
                    metrics = S.forward_backward(ddp, mbs, cfg)
            finally:
                S.plan_regions = plan
            grads = {n: p.main_grad.clone() for n, p in G.unwrap(ddp).named_parameters()
                     if p.requires_grad}
            name = f"{scope}_{'planned' if planned else 'unplanned'}"
            out[f"{name}_collectives"] = calls.total
            out[f"{name}_int_all_reduce"] = calls.count("all_reduce", integer=True)
            out[f"{name}_host_reads"] = reads.total
            runs[planned] = (metrics, grads)
        (pm, pg), (um, ug) = runs[True], runs[False]
        out[f"{scope}_metrics_equal"] = pm == um
        out[f"{scope}_grounding_loss"] = pm["grounding_loss"]
        out[f"{scope}_grad_max_abs"] = max(float((pg[k] - ug[k]).abs().max()) for k in ug)
    ddp.zero_grad_buffer()
    return out


def main(workdir: Path) -> None:
    from trainer.data import build_tokenizer, sources
    from trainer.data.writer import write_shards
    from trainer.eval import evaluate

    launch = read_launch_env()
    init_distributed(launch)
    shards = workdir / "shards"
    if launch.rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        write_shards(sources.fashion_mnist("test", count=40, regions="box"), shards, "fm", 16,
                     info={"classnames": list(sources.FASHION_MNIST_CLASSES)})
    torch.distributed.barrier()
    cfg = load_config(None, overrides(shards))
    layout = ParallelLayout(launch.world_size, ep=2).initialize(seed=0)
    model = B.build_for_training(cfg, layout)
    with CollectiveCalls() as calls, HostReads() as reads:
        result = evaluate(G.wrap_ddp(model), cfg, layout, build_tokenizer(cfg.data.tokenizer))
    eval_counts = {"eval_collectives": calls.total, "eval_host_reads": reads.total,
                   "eval_int_all_reduce": calls.count("all_reduce", integer=True),
                   "eval_region_reads": sum(n for site, n in reads.where.items()
                                            if "trainer/step.py" in site)}
    checkpoint.save_checkpoint(workdir / "ckpt", 1, model, config_to_dict(cfg), layout)
    if launch.rank == 0:
        (workdir / "dp2.json").write_text(json.dumps(result, indent=1))
    plan = {**eval_counts, **region_plan_case(shards, launch.world_size)}
    (workdir / f"plan_rank{launch.rank}.json").write_text(json.dumps(plan, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
