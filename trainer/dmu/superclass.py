"""Mobile V-MoE's super-classes: k-means of the class-name text embeddings into E groups, one
per expert, written as the ``model.vision.moe.superclass_map`` file.

    python -m trainer.dmu.superclass --checkpoint CKPT --experts 10 --out superclasses.json \\
        [--classnames-from data/eval] [--config X.yaml key=value ...]

The text tower of CKPT (any of our checkpoints, dense or MoE, built from its own saved config)
embeds each class name through ``eval.templates`` (averaged, as zero-shot classification does);
k-means (seeded by ``train.seed``) groups the normalised class embeddings. Class names come from
``eval.classnames``, else the ``dataset.json`` beside ``--classnames-from`` (or
``data.eval_urls``). Output: ``{"superclass_of_class": [expert per class label], "classnames":
[...], "experts": E}``. The paper derives super-classes from a dense model's confusion matrix;
text embeddings need no labelled pass over the data.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("upclip")


def superclasses(class_embeddings, experts: int, seed: int = 0, iters: int = 100) -> list[int]:
    """[C, e] class embeddings -> the super-class (expert) of each class."""
    import torch.nn.functional as F

    from trainer.dmu.kmeans import kmeans

    if class_embeddings.shape[0] < experts:
        raise ValueError(f"{class_embeddings.shape[0]} classes cannot fill {experts} experts")
    labels, _ = kmeans(F.normalize(class_embeddings.float(), dim=-1), experts, seed=seed,
                       iters=iters)
    return labels.tolist()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m trainer.dmu.superclass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint (directory or root)")
    p.add_argument("--experts", type=int, required=True, help="E: one super-class per expert")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--classnames-from", default="", help="eval shards whose dataset.json "
                   "lists classnames (default: data.eval_urls)")
    p.add_argument("--config", help="YAML for eval.templates / eval.classnames / seed")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)

    from trainer import checkpoint
    from trainer.config import ConfigError, config_from_saved, load_config
    from trainer.eval.zeroshot import class_names

    try:
        cfg = load_config(args.config, args.overrides)
        if args.classnames_from:
            cfg.data.eval_urls = args.classnames_from
        names = class_names(cfg)
        saved = config_from_saved(checkpoint.read_manifest(args.checkpoint)["config"])
        if args.experts < 1:
            raise ConfigError(f"--experts={args.experts} must be >= 1")
    except (ConfigError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from trainer.models.build import build_for_training
    from trainer.data import build_tokenizer
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
    from trainer.eval.names import templates
    from trainer.eval.zeroshot import classifier

    init_distributed(read_launch_env())
    layout = ParallelLayout(1).initialize(seed=cfg.train.seed)
    saved.parallel.tp = saved.parallel.pp = saved.parallel.ep = 1
    saved.train.trainable = []
    model = build_for_training(saved, layout)
    checkpoint.load_model(args.checkpoint, model, layout)
    model.eval()
    with torch.no_grad():
        weights = classifier(model.encode_text, build_tokenizer(saved.data.tokenizer), names,
                             templates(cfg))                                 # [e, C]
    groups = superclasses(weights.t(), args.experts, seed=cfg.train.seed)
    Path(args.out).write_text(json.dumps({"superclass_of_class": groups, "classnames": names,
                                          "experts": args.experts}, indent=1))
    for e in range(args.experts):
        log.info("expert %d: %s", e, ", ".join(n for n, g in zip(names, groups) if g == e)
                 or "(no class)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
