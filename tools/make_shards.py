#!/usr/bin/env python
"""Write WebDataset shards in UpCLIP's sample format (trainer/data/README.md).

  python tools/make_shards.py synthetic --out data/scenes --count 2000 --seed 0
  python tools/make_shards.py fashion-mnist --out data/fmnist-train --split train --count 10000 \
      [--regions box]
  python tools/make_shards.py fashion-mnist --out data/fmnist-eval --split test
  python tools/make_shards.py folder --out data/mine --images imgs/ --captions caps.csv \
      [--regions regions.jsonl]

Refuses to write into an existing non-empty --out. Prints the brace pattern of the shards and
writes OUT/dataset.json (pattern, count, shard names, and for Fashion-MNIST the class names).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tools.errors import usage_error  # noqa: E402
from trainer.data import sources  # noqa: E402
from trainer.data.writer import OutputExistsError, check_fresh_output, write_shards  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)

    def common(sp: argparse.ArgumentParser, prefix: str, shard_size: int) -> None:
        sp.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
        sp.add_argument("--prefix", default=prefix, help=f"shard file prefix (default {prefix})")
        sp.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")
        sp.add_argument("--quiet", action="store_true", help="no progress bar (none off a tty)")

    s = sub.add_parser("synthetic", help="coloured-shape scenes with one region per shape")
    common(s, "scenes", 1000)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=64, help="image side in pixels")
    s.add_argument("--min-shapes", type=int, default=1)
    s.add_argument("--max-shapes", type=int, default=3)
    s.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg")

    f = sub.add_parser("fashion-mnist", help=f"real images from {sources.FASHION_MNIST_ROOT}")
    common(f, "fmnist", 1000)
    f.add_argument("--split", choices=("train", "test"), default="train")
    f.add_argument("--count", type=int, default=0, help="samples (0: the whole split)")
    f.add_argument("--offset", type=int, default=0, help="first sample index")
    f.add_argument("--size", type=int, default=64, help="upscaled image side in pixels")
    f.add_argument("--root", default=sources.FASHION_MNIST_ROOT)
    f.add_argument("--format", choices=("jpg", "png", "webp"), default="png")
    f.add_argument("--regions", choices=("none", "box"), default="none",
                   help="box: one region per image, the garment's tight box with the caption")

    d = sub.add_parser("folder", help="a folder of images + captions CSV/JSONL (+ region JSONL)")
    common(d, "shard", 1000)
    d.add_argument("--images", required=True, help="image folder; caption file paths are relative to it")
    d.add_argument("--captions", required=True, help="CSV (image,caption header) or JSONL")
    d.add_argument("--regions", default=None, help='JSONL {"key"|"image": ..., "regions": [...]}')
    return p


def validate(args: argparse.Namespace) -> None:
    if args.shard_size <= 0:
        usage_error(f"--shard-size={args.shard_size} must be > 0")
    if args.source == "synthetic":
        if args.count <= 0:
            usage_error(f"--count={args.count} must be > 0")
        if args.size < 8:
            usage_error(f"--size={args.size} must be >= 8")
        if args.min_shapes < 1 or args.max_shapes < args.min_shapes:
            usage_error(f"--min-shapes={args.min_shapes} --max-shapes={args.max_shapes}: need "
                    "1 <= min <= max")
    elif args.source == "fashion-mnist":
        n = 60000 if args.split == "train" else 10000
        if args.count < 0:
            usage_error(f"--count={args.count} must be >= 0 (0: the whole split)")
        if not 0 <= args.offset < n:
            usage_error(f"--offset={args.offset} must be in [0, {n}) for --split {args.split}")
        if args.size < 1:
            usage_error(f"--size={args.size} must be > 0")
    else:
        if not os.path.isdir(args.images):
            usage_error(f"--images {args.images}: no such directory")
        if not os.path.isfile(args.captions):
            usage_error(f"--captions {args.captions}: no such file")
        if args.regions is not None and not os.path.isfile(args.regions):
            usage_error(f"--regions {args.regions}: no such file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    try:
        check_fresh_output(args.out)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    info: dict = {"source": args.source}
    stats: dict = {}
    if args.source == "synthetic":
        total = args.count
        samples = sources.synthetic_scenes(args.count, args.seed, args.size, args.min_shapes,
                                           args.max_shapes, args.format)
        info.update(seed=args.seed, size=args.size)
    elif args.source == "fashion-mnist":
        total = args.count or (60000 if args.split == "train" else 10000) - args.offset
        samples = sources.fashion_mnist(args.split, args.count, args.offset, args.size, args.root,
                                        args.format, args.regions)
        info.update(split=args.split, classnames=list(sources.FASHION_MNIST_CLASSES),
                    template=sources.FASHION_MNIST_TEMPLATE, size=args.size)
    else:
        total = len(sources.read_captions(args.captions))
        samples = sources.folder_samples(args.images, args.captions, args.regions, stats)

    bar = tqdm(samples, total=total, desc=f"{args.source} -> {args.out}", unit="sample",
               disable=True if args.quiet else None)  # None: only on a terminal
    try:
        sink = write_shards(bar, args.out, args.prefix, args.shard_size, info)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if stats:
        print("folder: " + json.dumps(stats, sort_keys=True))
    print(f"wrote {sink.count} samples in {len(sink.paths)} shards: {sink.pattern()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
