"""``trainer.train`` that also saves every evaluation's embeddings and logs the sample keys of
every training step (tests only).

    torchrun --nproc_per_node=2 tests/distributed/train_dump_eval.py --config X key=value ...

Same arguments and behaviour as ``python -m trainer.train``. It wraps
``trainer.eval.compute_metrics`` (which every evaluation calls with the embeddings gathered over
the data-parallel ranks): before the metrics are computed, global rank 0 saves the embeddings to
``RUN_DIR/eval_embeddings/NN.pt``, NN counting this process's evaluations from 00 (the one
before the first step when the run starts at step 0). test_train_run.py compares the upcycled
model's first evaluation with the dense model's last: function preservation at full precision
through the whole job, where the logged metrics (ranks, top-1) are coarse.

Every rank also appends ``{"step", "dp_rank", "keys"}`` per training step to
``RUN_DIR/keys/rank_R.jsonl`` (R: global rank): which samples each step trained on, for the
data-position checks across a resume at another layout.
"""
from __future__ import annotations

import sys
from pathlib import Path

FIELDS = ("image", "image_ids", "labels", "text", "text_ids", "region", "region_text",
          "region_text_ids")


def install() -> None:
    import torch
    import torch.distributed as dist

    import trainer.eval as E

    original = E.compute_metrics
    calls = [0]

    def compute_metrics(emb, cfg, *args, **kwargs):
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = Path(cfg.run_dir) / "eval_embeddings"
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: getattr(emb, k) for k in FIELDS}, out / f"{calls[0]:02d}.pt")
        calls[0] += 1
        return original(emb, cfg, *args, **kwargs)

    E.compute_metrics = compute_metrics


def install_key_log() -> None:
    import json

    import torch.distributed as dist

    from trainer.data.batches import Batches

    original = Batches.next

    def next_(self, step: int) -> list[dict]:
        microbatches = original(self, step)
        if self.loader is not None:
            out = Path(self.cfg.run_dir) / "keys"
            out.mkdir(parents=True, exist_ok=True)
            rank = dist.get_rank() if dist.is_initialized() else 0
            keys = [k for mb in microbatches for k in mb["keys"]]
            with open(out / f"rank_{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "dp_rank": self.layout.dp_rank,
                                    "keys": keys}) + "\n")
        return microbatches

    Batches.next = next_


def main() -> int:
    from trainer.distributed.logs import install_filters

    install_filters()  # as trainer.train does, before install() imports megatron
    install()
    install_key_log()
    from trainer import train

    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
