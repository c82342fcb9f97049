#!/usr/bin/env python
"""Merge region pseudo-labels into existing shards, writing new shards.

  python tools/add_regions.py --shards 'data/cc-{000000..000099}.tar' \
      --regions pseudo.jsonl --out data/cc-regions [--mode replace|append]

`--regions` is JSONL, one line per sample: {"key": KEY, "regions": [{"bbox": [x0,y0,x1,y1],
"caption": str, "score": float?}, ...]} (bbox in pixels of the stored image). Each input shard
is rewritten under --out with the same file name (NAME.tar, also for a compressed
NAME.tar.gz; two inputs of one name are refused); a matched sample's JSON gets the regions
("replace": instead of any it had, "append": after them), other samples are copied unchanged.
Prints matched / unmatched counts (and writes them to OUT/add_regions.json).

Memory stays flat whatever the JSONL's size: the labels are first indexed on disk
(OUT/_regions_index.sqlite, trainer/data/region_index.py, removed at the end; it needs about
the JSONL's size in free disk), then each shard streams through with one lookup per sample.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from tools.errors import usage_error  # noqa: E402
from trainer.data.region_index import RegionIndex  # noqa: E402
from trainer.data.stream import read_shard  # noqa: E402
from trainer.data.urls import expand_urls  # noqa: E402
from trainer.data.writer import (OutputExistsError, ShardSink, check_fresh_output,  # noqa: E402
                                 check_output_names, output_shard_name)


INDEX_FILE = "_regions_index.sqlite"


def valid_region(r: object) -> bool:
    if not isinstance(r, dict) or not isinstance(r.get("caption"), str) or not r["caption"].strip():
        return False
    box = r.get("bbox")
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in box))


def merge_sample(sample: dict, regions: list, mode: str) -> tuple[dict, bool]:
    """The sample with its JSON carrying `regions`; True if the old JSON was unreadable."""
    out = {k: v for k, v in sample.items() if k not in ("__url__",)}
    meta, malformed = {}, False
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                meta, malformed = {}, True
        except ValueError:
            meta, malformed = {}, True
    if "caption" not in meta and "txt" in sample:
        meta["caption"] = sample["txt"].decode("utf-8", errors="replace").strip()
    old = meta.get("regions") if isinstance(meta.get("regions"), list) else []
    meta["regions"] = (old + regions) if mode == "append" else regions
    out["json"] = meta
    return out, malformed


def process(sample: dict, labels: RegionIndex, mode: str, report: dict) -> dict:
    sample.pop("__duplicate__", None)
    report["samples"] += 1
    found = labels.lookup(sample["__key__"])
    if found is None:
        report["unmatched_samples"] += 1
        return {k: v for k, v in sample.items() if k != "__url__"}
    regions = [r for r in found if valid_region(r)]
    report["invalid_regions"] += len(found) - len(regions)
    out, malformed = merge_sample(sample, regions, mode)
    report["malformed_json_replaced"] += malformed
    report["matched"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input shards (brace pattern, list file, dir)")
    p.add_argument("--regions", required=True, help="pseudo-label JSONL keyed by sample key")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--mode", choices=("replace", "append"), default="replace")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isfile(args.regions):
        usage_error(f"--regions {args.regions}: no such file")
    try:
        urls = expand_urls(args.shards, "--shards")
    except (FileNotFoundError, ValueError) as e:
        usage_error(str(e).splitlines()[0] if str(e) else f"--shards {args.shards}: no shards")
    try:
        check_output_names(urls, "--shards")
    except ValueError as e:
        usage_error(str(e))
    try:
        check_fresh_output(args.out)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        labels = RegionIndex.build(args.regions, os.path.join(args.out, INDEX_FILE))
    except (ValueError, UnicodeDecodeError) as e:
        shutil.rmtree(args.out, ignore_errors=True)  # check_fresh_output made it: still ours
        usage_error(f"--regions {e}" if isinstance(e, UnicodeDecodeError) else str(e))
    report = {"samples": 0, "matched": 0, "unmatched_samples": 0, "invalid_regions": 0,
              "malformed_json_replaced": 0, "duplicate_label_lines": labels.duplicate_lines(),
              "shard_errors": []}
    for url in tqdm(urls, desc="shards", unit="shard",
                    disable=True if args.quiet else None):  # None: only on a terminal
        with ShardSink(args.out, file_name=output_shard_name(url)) as sink:
            try:
                for sample in read_shard(url):
                    sink.write(process(sample, labels, args.mode, report))
            except Exception as e:  # keep going: report the shard, keep what was readable
                report["shard_errors"].append(f"{url}: {type(e).__name__}: {e}"[:300])
    unused, examples = labels.unused(10)
    labels.close()
    report["unused_label_keys"] = unused
    report["unused_label_examples"] = examples
    with open(os.path.join(args.out, "add_regions.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
