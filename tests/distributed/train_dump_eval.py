"""``trainer.train`` that also saves every evaluation's embeddings (tests only).

    torchrun --nproc_per_node=2 tests/distributed/train_dump_eval.py --config X key=value ...

Same arguments and behaviour as ``python -m trainer.train``. It wraps
``trainer.eval.compute_metrics`` (which every evaluation calls with the embeddings gathered over
the data-parallel ranks): before the metrics are computed, global rank 0 saves the embeddings to
``RUN_DIR/eval_embeddings/NN.pt``, NN counting this process's evaluations from 00 (the one
before the first step when the run starts at step 0). test_train_run.py compares the upcycled
model's first evaluation with the dense model's last: function preservation at full precision
through the whole job, where the logged metrics (ranks, top-1) are coarse.
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


def main() -> int:
    from trainer.distributed.logs import install_filters

    install_filters()  # as trainer.train does, before install() imports megatron
    install()
    from trainer import train

    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
