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
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer import checkpoint  # noqa: E402
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
    result = evaluate(G.wrap_ddp(model), cfg, layout, build_tokenizer(cfg.data.tokenizer))
    checkpoint.save_checkpoint(workdir / "ckpt", 1, model, config_to_dict(cfg), layout)
    if launch.rank == 0:
        (workdir / "dp2.json").write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
