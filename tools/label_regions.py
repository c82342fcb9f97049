#!/usr/bin/env python
"""Label shards with region pseudo-labels, VESL-style: noun phrases from each caption, boxes for
them from an open-vocabulary detector (OWL-ViT / OWLv2, a local transformers directory).

  python tools/label_regions.py --shards 'data/cc-{000000..000099}.tar' \\
      --detector models/owlv2-base-patch16-ensemble --out data/cc-regions \\
      [--score 0.3] [--nms-iou 0.5] [--max-regions 16] [--max-phrases 8] \\
      [--task-index I --task-count N]

Each input shard NAME.tar (or NAME.tar.gz ...) becomes OUT/NAME.tar (two inputs of one NAME are
refused), every sample kept, each labelled sample's JSON
carrying {"caption", "regions": [{"bbox": [x0, y0, x1, y1], "caption": phrase, "score"}]} with
boxes in pixels of the stored image. OUT/_done/NAME.json marks a finished shard (with its counts):
rerunning the same command skips finished shards and redoes an interrupted one. With
--task-count N, task I labels the I-th contiguous block of the shard list (a SLURM array:
slurm/label_regions.sh). Prints the counts of this task's shards; once every shard is done,
OUT/label_regions_report.json holds the totals.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.errors import usage_error  # noqa: E402
from trainer.data.urls import check_local_shards, expand_urls  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input shards (brace pattern, list file, dir)")
    p.add_argument("--detector", required=True, help="OWL-ViT/OWLv2 directory (save_pretrained)")
    p.add_argument("--out", required=True, help="output directory (new, or this run's to resume)")
    p.add_argument("--score", type=float, default=0.3, help="keep boxes scoring above this")
    p.add_argument("--nms-iou", type=float, default=0.5, help="per-phrase NMS IoU threshold")
    p.add_argument("--max-regions", type=int, default=16, help="regions per image (0: all)")
    p.add_argument("--max-phrases", type=int, default=8, help="phrases per caption (0: all)")
    p.add_argument("--prompt", default="{}", help="detector query for a phrase, e.g. 'a photo of {}'")
    p.add_argument("--mode", choices=("replace", "append"), default="replace",
                   help="detector regions instead of / after the sample's own")
    p.add_argument("--batch-size", type=int, default=16, help="images per detector call")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (auto: cuda if present)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--task-index", type=int, default=0, help="this task's index (array tasks)")
    p.add_argument("--task-count", type=int, default=1, help="how many tasks share the shards")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def validate(args: argparse.Namespace) -> list[str]:
    """The shard URLs; exits with one line on a bad flag."""
    if not 0.0 <= args.score < 1.0:
        usage_error(f"--score={args.score} must be in [0, 1)")
    if not 0.0 < args.nms_iou <= 1.0:
        usage_error(f"--nms-iou={args.nms_iou} must be in (0, 1]")
    for flag in ("max_regions", "max_phrases"):
        if getattr(args, flag) < 0:
            usage_error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 0")
    if args.batch_size < 1:
        usage_error(f"--batch-size={args.batch_size} must be >= 1")
    if args.task_count < 1 or not 0 <= args.task_index < args.task_count:
        usage_error(f"--task-index={args.task_index} --task-count={args.task_count}: need "
                    "0 <= index < count")
    if "{}" not in args.prompt:
        usage_error(f"--prompt {args.prompt!r} has no '{{}}' for the phrase")
    if not os.path.isdir(args.detector):
        usage_error(f"--detector {args.detector}: no such directory")
    try:
        urls = expand_urls(args.shards, "--shards")
        check_local_shards(urls, "--shards")
    except (FileNotFoundError, ValueError) as e:
        usage_error(str(e).splitlines()[0] if str(e) else f"--shards {args.shards}: no shards")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        usage_error(f"--out {args.out} is a file")
    return urls


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    urls = validate(args)

    import torch
    from tqdm import tqdm

    from trainer.data.vesl.detector import DetectOptions, DetectorError, RegionDetector, read_model_type
    from trainer.data.vesl.label import (LabelOptions, SettingsMismatch, ShardLabeller,
                                         claim_output, done_path, settings_of, summarize,
                                         task_shards, write_total_report)
    from trainer.data.writer import check_output_names

    opts = LabelOptions(DetectOptions(args.score, args.nms_iou, args.max_regions, prompt=args.prompt),
                        max_phrases=args.max_phrases, batch_size=args.batch_size, mode=args.mode)
    try:
        check_output_names(urls, "--shards")
        read_model_type(args.detector)
    except (ValueError, DetectorError) as e:
        usage_error(str(e))
    try:  # before the detector loads: a resume with other flags fails at once
        claim_output(Path(args.out), settings_of(urls, args.detector, opts))
    except SettingsMismatch as e:
        usage_error(str(e))
    mine = task_shards(urls, args.task_index, args.task_count)
    todo = [u for u in mine if not done_path(Path(args.out), u).is_file()]
    tag = f"label_regions[{args.task_index}/{args.task_count}]"
    detector = None
    if todo:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        try:
            detector = RegionDetector(args.detector, device, dtype)
        except DetectorError as e:
            usage_error(str(e))
        print(f"{tag}: loaded detector {args.detector} ({detector.model_type}) on {device} "
              f"({args.dtype}); {len(todo)} of {len(mine)} shards to label", file=sys.stderr)
    for u in mine:
        if u not in todo:
            print(f"{tag}: {u}: done already, skipped", file=sys.stderr)
    if detector is not None:
        labeller = ShardLabeller(lambda images, phrases: detector.detect(images, phrases, opts.detect),
                                 opts, args.out)
        bar = tqdm(unit="sample", desc=tag, disable=args.quiet)  # shard sizes are unknown
        for k, u in enumerate(todo):
            bar.set_postfix(shard=f"{k + 1}/{len(todo)}")
            r = labeller.label(u, on_batch=bar.update)
            tqdm.write(f"{tag}: labelled {u} -> {r['output']}: {r['samples']} samples, "
                       f"{r['labelled']} labelled, {r['regions']} regions ({r['seconds']} s)"
                       + (f"; read error: {r['read_error']}" if r["read_error"] else ""),
                       file=sys.stderr)
        bar.close()
    report = summarize(args.out, mine)
    print(json.dumps({"task": args.task_index, "tasks": args.task_count, **report}))
    write_total_report(args.out, urls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
