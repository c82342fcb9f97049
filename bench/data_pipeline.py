#!/usr/bin/env python
"""Data pipeline throughput on CPU: the full pipeline vs raw PIL decode of the same JPEGs.

  python bench/data_pipeline.py [--count 1024 --size 256 --image-size 224 --repeats 3]

Writes bench/results/data_pipeline_cpu.json: samples/s (median of --repeats) of
  raw_pil_decode     Image.open + convert("RGB") of the shard JPEG bytes, one process
  pipeline_inproc    shards -> shuffle -> decode -> box-aware crop -> normalise -> tokenize
                     (caption + up to R regions) -> collate, in the main process with one torch
                     thread, as in a DataLoader worker (= per-worker throughput)
  pipeline_workers   the same through the DataLoader with --workers worker processes
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset  # noqa: E402
from PIL import Image  # noqa: E402

from trainer.data.config import DataConfig  # noqa: E402
from trainer.data.pipeline import build_train_loader  # noqa: E402
from trainer.data.sources import synthetic_scenes  # noqa: E402
from trainer.data.stream import read_shard  # noqa: E402
from trainer.data.urls import expand_urls  # noqa: E402
from trainer.data.writer import write_shards  # noqa: E402


def bench_raw(pattern: str) -> tuple[float, int]:
    blobs = [s["jpg"] for url in expand_urls(pattern) for s in read_shard(url)]  # read outside timing
    t = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            im.convert("RGB")
    return len(blobs) / (time.perf_counter() - t), len(blobs)


def bench_pipeline(cfg: DataConfig) -> tuple[float, dict]:
    threads = torch.get_num_threads()
    if cfg.workers == 0:
        torch.set_num_threads(1)  # as in a DataLoader worker: per-worker throughput
    loader = build_train_loader(cfg, rank=0, world=1)
    n, shapes = 0, {}
    t = time.perf_counter()
    for batch in loader:
        n += len(batch["keys"])
        shapes = {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    rate = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return rate, shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1024, help="samples in the benchmark shards")
    p.add_argument("--size", type=int, default=256, help="stored JPEG side")
    p.add_argument("--image-size", type=int, default=224, help="model input side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-regions", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "data_pipeline_cpu.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sink = write_shards(synthetic_scenes(args.count, seed=0, size=args.size, max_shapes=4),
                            tmp, "bench", shard_size=max(1, args.count // 8))
        pattern = sink.pattern()
        jpeg_kb = sum(os.path.getsize(p) for p in sink.paths) / args.count / 1024

        def cfg(workers: int) -> DataConfig:
            c = DataConfig(train_urls=pattern, batch_size=args.batch_size, workers=workers,
                           image_size=args.image_size, max_regions=args.max_regions,
                           shuffle_buffer=256, drop_last=False)
            c.tokenizer.context_length = 77
            return c

        raw, inproc, multi = [], [], []
        shapes: dict = {}
        for r in range(args.repeats):
            raw.append(bench_raw(pattern)[0])
            rate, shapes = bench_pipeline(cfg(0))
            inproc.append(rate)
            multi.append(bench_pipeline(cfg(args.workers))[0])
            print(f"run {r}: raw PIL {raw[-1]:.0f}/s, pipeline in-process {inproc[-1]:.0f}/s, "
                  f"{args.workers} workers {multi[-1]:.0f}/s", flush=True)

    med = statistics.median
    result = {
        "benchmark": "data_pipeline",
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pillow": PIL.__version__, "webdataset": getattr(webdataset, "__version__", "?")},
        "data": {"samples": args.count, "stored_jpeg_side": args.size, "mean_jpeg_kib": round(jpeg_kb, 1),
                 "max_regions": args.max_regions, "tokenizer": "clip_bpe"},
        "shapes": shapes,
        "samples_per_s": {
            "raw_pil_decode": round(med(raw), 1),
            "pipeline_inproc_per_worker": round(med(inproc), 1),
            f"pipeline_{args.workers}_workers_total": round(med(multi), 1),
            f"pipeline_{args.workers}_workers_per_worker": round(med(multi) / max(1, args.workers), 1),
        },
        "pipeline_over_raw_decode": round(med(inproc) / med(raw), 3),
        "runs": {"raw_pil_decode": raw, "pipeline_inproc": inproc, "pipeline_workers": multi},
        "note": "2-core shared CPU; worker processes compete with the main process for cores",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result["samples_per_s"]), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
