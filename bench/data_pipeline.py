#!/usr/bin/env python
"""Data pipeline throughput on CPU: the full pipeline vs raw PIL decode of the same JPEGs.

  python bench/data_pipeline.py [--count 1024 --short-side 512 --quality 90 --repeats 3]
  python bench/data_pipeline.py --profile      # cProfile of the in-process pipeline, no JSON

What the data are (made here, deterministic in --seed, so the benchmark needs no download):
  JPEG quality 90, shorter side 512 px (as img2dataset downloads resized above the train size),
  aspect ratios 1:1, 4:3, 3:4, 3:2, 2:3. Pixels are photo-like: 1/f^1.35 colour noise (the
  power law of natural images) with drawn objects, ~2.2 bits/pixel at q90 (~92 KiB a JPEG), the
  range of real photographs (flat synthetic scenes compress to a fraction of that and decode
  several times faster, which would flatter the pipeline). 2-6 regions per image, each the box of
  a drawn object with a detector-style caption from a small vocabulary (so region captions
  repeat, as pseudo-labels do). Captions are unique 6-24-word web-alt-text-like strings (so the
  caption cache cannot help them; only the per-word BPE cache can).

What is timed (samples/s, median of --repeats; each repeat reads every shard once):
  raw_pil_decode      Image.open(BytesIO(b)).convert("RGB") of the JPEG bytes, already in memory
                      (a full decode: the baseline of the issue), one process, one thread
  pipeline_inproc     the whole training pipeline as build_train_loader runs it: tar read ->
                      shuffle buffer -> JSON/region parsing -> decode (reduced-size JPEG decode
                      when data.augment.jpeg_draft) -> box-aware random resized crop to S x S ->
                      tokenize caption + up to R region captions (CLIP BPE, L = 77) -> collate
                      [B, ...] batches, in the main process with one torch thread, as inside one
                      DataLoader worker (= throughput per worker). For data.normalize=loader
                      (float CLIP-normalised images, the default) and =device (uint8 images,
                      normalised later on the accelerator by normalize_on_device)
  pipeline_1_worker_device_normalize
                      normalize=device through the DataLoader with one worker process (the real
                      per-worker path: batches in shared memory, handed to the main process,
                      which only iterates, so the worker has a core to itself here)
  pipeline_workers    the same (normalize=loader) through the DataLoader with --workers worker
                      processes; "per worker" = total / workers. On this 2-core machine the
                      main process shares the cores with the workers.
The ratio pipeline / raw decode is per worker (in-process pipeline over one-process decode).
  interleaved         the in-process pipeline and raw decode taking turns, a batch each, so
                      both meet the same load from other jobs (the steadiest ratio on a shared
                      machine; see `bench_interleaved`)
stage_ms_per_sample: where the time goes, each stage timed on its own (see `stage_times`).
--before PATH copies an earlier run's numbers (e.g. of the previous code) into the JSON.

Writes bench/results/data_pipeline_cpu.json (device "cpu", CPU model, versions, shapes, runs).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import webdataset  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.hostinfo import cpu_model  # noqa: E402
from trainer.data.config import DataConfig  # noqa: E402
from trainer.data.pipeline import build_train_loader  # noqa: E402
from trainer.data.stream import read_shard  # noqa: E402
from trainer.data.urls import expand_urls  # noqa: E402
from trainer.data.writer import write_shards  # noqa: E402

ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))  # width : height
OBJECTS = ("dog", "cat", "person", "car", "bicycle", "tree", "chair", "cup", "bottle", "bird",
           "horse", "boat", "sign", "lamp", "table", "flower")
COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "white": (235, 235, 235),
          "black": (20, 20, 20), "yellow": (230, 210, 40), "brown": (120, 80, 40), "grey": (128, 128, 128)}
WORDS = ("the a of and in on with for at by from to photo image picture view close up old new "
         "red blue green black white small large beautiful vintage modern street city house "
         "garden beach mountain river lake forest park road car bike dog cat woman man child "
         "people family wedding party food plate table kitchen room bedroom office window door "
         "sky sunset night light shadow wall floor wood stone metal glass paper book shirt dress "
         "shoes bag hat logo icon design pattern texture background illustration vector art "
         "painting drawing print poster card sale 2024 3d hd free stock high quality set of "
         "two three best top home interior exterior travel summer winter spring autumn").split()


def _texture(rng: np.random.Generator, n: int = 1024, alpha: float = 1.35) -> np.ndarray:
    """[n, n, 3] float colour noise with amplitude spectrum 1/f^alpha, unit std per channel."""
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    shape = (n, n // 2 + 1)
    shared = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    chans = []
    for _ in range(3):  # correlated channels, as in photos
        spec = 0.7 * shared + 0.3 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        x = np.fft.irfft2(spec / f ** alpha, s=(n, n))
        chans.append((x - x.mean()) / x.std())
    return np.stack(chans, -1)


def photo_samples(count: int, seed: int, short_side: int, quality: int) -> list[dict]:
    """Shard samples {"__key__", "jpg", "txt", "json"} of photo-like JPEGs with regions."""
    rng = np.random.default_rng(seed)
    textures = [_texture(rng) for _ in range(6)]
    samples = []
    for i in range(count):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        w, h = (short_side * aw // ah, short_side) if aw >= ah else (short_side, short_side * ah // aw)
        tex = textures[int(rng.integers(len(textures)))]
        n = tex.shape[0]
        if h > n or w > n:  # larger than the 1024 px textures: extend by reflection
            tex = np.pad(tex, ((0, max(0, h - n)), (0, max(0, w - n)), (0, 0)), mode="reflect")
        y0, x0 = int(rng.integers(0, tex.shape[0] - h + 1)), int(rng.integers(0, tex.shape[1] - w + 1))
        patch = tex[y0:y0 + h, x0:x0 + w]
        mean = rng.uniform(70, 170, size=3)
        img = Image.fromarray(np.clip(mean + rng.uniform(30, 50) * patch, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        regions = []
        for _ in range(int(rng.integers(2, 7))):
            bw, bh = int(rng.integers(w // 10, w // 2)), int(rng.integers(h // 10, h // 2))
            bx, by = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
            fill = tuple(int(c) for c in np.clip(np.array(COLORS[color]) + rng.normal(0, 10, 3), 0, 255))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((bx, by, bx + bw - 1, by + bh - 1), fill=fill)
            regions.append({"bbox": [bx, by, bx + bw, by + bh], "caption": f"a {color} {obj}",
                            "score": round(float(rng.random()), 3)})
        # keep the texture visible inside the objects too (real objects are not flat)
        arr = np.asarray(img).astype(np.float32)
        arr += 12.0 * patch[::-1, ::-1]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        n_words = int(rng.integers(6, 25))
        caption = " ".join(WORDS[int(j)] for j in rng.zipf(1.3, n_words) % len(WORDS))
        caption = f"{caption.capitalize()} #{i}"  # unique, as web captions mostly are
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        samples.append({"__key__": f"photo{i:06d}", "jpg": buf.getvalue(), "txt": caption,
                        "json": {"caption": caption, "regions": regions}})
    return samples


def bench_raw(blobs: list[bytes]) -> float:
    t = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs) / (time.perf_counter() - t)


def bench_pipeline(cfg: DataConfig) -> tuple[float, dict]:
    threads = torch.get_num_threads()
    if cfg.workers == 0:
        torch.set_num_threads(1)  # as in a DataLoader worker: per-worker throughput
    loader = build_train_loader(cfg, rank=0, world=1)
    n, shapes = 0, {}
    t = time.perf_counter()
    for batch in loader:
        n += len(batch["keys"])
        shapes = {k: f"{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
                  for k, v in batch.items() if isinstance(v, torch.Tensor)}
    rate = n / (time.perf_counter() - t)
    torch.set_num_threads(threads)
    return rate, shapes


def bench_interleaved(blobs: list[bytes], cfg: DataConfig) -> dict[str, float]:
    """The in-process pipeline and raw decode taking turns: one pipeline batch of B samples,
    then a raw decode of B JPEGs, over one epoch. Both sides of each pair meet the same load
    from other jobs on a shared machine, which whole-run timings, seconds apart, do not.
    Returns raw decode time / pipeline time (= pipeline samples/s over raw decode's) over the
    epoch, and the median over the pairs. `blobs`: the shards' JPEG bytes, in memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = time.perf_counter
    it = iter(build_train_loader(cfg, rank=0, world=1))
    pipe_s, raw_s, ratios, j = 0.0, 0.0, [], 0
    while True:
        t = clock()
        batch = next(it, None)
        dt = clock() - t
        if batch is None:
            break
        n = len(batch["keys"])
        t = clock()
        for i in range(j, j + n):
            Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
        rt = clock() - t
        j += n
        pipe_s, raw_s = pipe_s + dt, raw_s + rt
        ratios.append(rt / dt)
    torch.set_num_threads(threads)
    return {"epoch": raw_s / pipe_s, "median_pair": statistics.median(ratios),
            "pipeline_samples_per_s": j / pipe_s, "raw_samples_per_s": j / raw_s}


def stage_times(pattern: str, cfg: DataConfig) -> dict[str, float]:
    """Approximate ms per sample of each stage, timed one after another on every sample with the
    pipeline's own functions (one thread, no shuffle buffer; the sum is close to, not equal to,
    the pipeline's time per sample)."""
    from trainer.data.collate import Example
    from trainer.data.counters import DataCounters
    from trainer.data.pipeline import sample_processor
    from trainer.data.schema import decode_sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    proc = sample_processor(cfg, True, None)
    tf, counters = proc.transform, DataCounters()
    acc = dict.fromkeys(("tar_read", "parse_header_json_regions", "jpeg_decode", "crop_resize",
                         "boxes", "tokenize", "collate"), 0.0)
    n, examples = 0, []
    clock = time.perf_counter
    t = clock()
    for url in expand_urls(pattern):
        for raw in read_shard(url):
            acc["tar_read"] += clock() - t
            rng = random.Random(n)
            t = clock()
            d = decode_sample(raw, counters, True, load=lambda im: im)  # header only
            t, acc["parse_header_json_regions"] = clock(), acc["parse_header_json_regions"] + clock() - t
            window, flip = tf.window(d.image.width, d.image.height, rng)
            rgb, k = tf.decode(d.image, window)
            t, acc["jpeg_decode"] = clock(), acc["jpeg_decode"] + clock() - t
            placed = tf.resample(rgb, k, window, flip)
            t, acc["crop_resize"] = clock(), acc["crop_resize"] + clock() - t
            boxes, keep = tf.boxes(placed, d.boxes)
            t, acc["boxes"] = clock(), acc["boxes"] + clock() - t
            caps = [c for c, kk in zip(d.region_captions, keep) if kk][: cfg.max_regions]
            tokens = [proc.tokenizer.row_ids(c) for c in [d.caption] + caps]
            t, acc["tokenize"] = clock(), acc["tokenize"] + clock() - t
            examples.append(Example(d.key, placed.pixels, boxes[: len(caps)] / tf.size, tokens, d.label))
            n += 1
            if len(examples) == cfg.batch_size:
                t = clock()
                proc.collate(examples)
                acc["collate"] += clock() - t
                examples = []
            t = clock()
    torch.set_num_threads(threads)
    return {k: round(v / n * 1e3, 3) for k, v in acc.items()}


def _ratio_names(workers: int) -> dict[str, str]:
    return {"pipeline_inproc": "per_worker_inproc",
            "pipeline_inproc_device_normalize": "per_worker_inproc_device_normalize",
            "pipeline_1_worker_device_normalize": "per_worker_1_worker_device_normalize",
            "pipeline_workers": f"per_worker_{workers}_workers"}


def paired(runs: dict[str, list[float]], workers: int) -> dict[str, float]:
    """Median over repeats of each pipeline run / the raw decode run of the same repeat."""
    raw = runs["raw_pil_decode"]
    return {name: round(statistics.median(v / r / (workers if k == "pipeline_workers" else 1)
                                          for v, r in zip(runs[k], raw)), 3)
            for k, name in _ratio_names(workers).items() if runs.get(k)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1024, help="samples in the benchmark shards")
    p.add_argument("--short-side", type=int, default=512, help="stored JPEG shorter side")
    p.add_argument("--quality", type=int, default=90, help="stored JPEG quality")
    p.add_argument("--image-size", type=int, default=224, help="model input side S")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-regions", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-draft", action="store_true", help="data.augment.jpeg_draft=false")
    p.add_argument("--profile", action="store_true", help="cProfile one in-process epoch; no JSON")
    p.add_argument("--profile-normalize", choices=("loader", "device"), default="loader")
    p.add_argument("--before", default="", help="JSON of an earlier run (e.g. of the previous "
                   "code) whose samples/s and ratios are copied under 'before' for comparison")
    p.add_argument("--before-label", default="", help="what --before measured (e.g. a commit)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "data_pipeline_cpu.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        samples = photo_samples(args.count, args.seed, args.short_side, args.quality)
        sink = write_shards(samples, tmp, "bench", shard_size=max(1, args.count // 8))
        jpeg_bytes = [len(s["jpg"]) for s in samples]
        pixels = [Image.open(io.BytesIO(s["jpg"])).size for s in samples]
        bpp = sum(jpeg_bytes) * 8 / sum(w * h for w, h in pixels)
        del samples
        print(f"wrote {args.count} samples in {time.perf_counter() - t0:.0f}s: mean JPEG "
              f"{np.mean(jpeg_bytes) / 1024:.1f} KiB, {bpp:.2f} bits/pixel", flush=True)
        pattern = sink.pattern()
        blobs = [s["jpg"] for url in expand_urls(pattern) for s in read_shard(url)]  # untimed

        def cfg(workers: int, normalize: str = "loader") -> DataConfig:
            c = DataConfig(train_urls=pattern, batch_size=args.batch_size, workers=workers,
                           image_size=args.image_size, max_regions=args.max_regions,
                           shuffle_buffer=256, drop_last=False, seed=args.seed)
            c.tokenizer.context_length = 77
            c.normalize = normalize
            c.augment.jpeg_draft = not args.no_draft
            return c

        if args.profile:
            torch.set_num_threads(1)
            prof = cProfile.Profile()
            loader = build_train_loader(cfg(0, args.profile_normalize), rank=0, world=1)
            prof.enable()
            n = sum(len(b["keys"]) for b in loader)
            prof.disable()
            st = pstats.Stats(prof).sort_stats("tottime")
            print(f"{n} samples")
            st.print_stats(30)
            st.sort_stats("cumulative").print_stats("trainer/data", 30)
            return 0

        runs: dict[str, list[float]] = {"raw_pil_decode": [], "pipeline_inproc": [],
                                        "pipeline_inproc_device_normalize": [],
                                        "pipeline_1_worker_device_normalize": [], "pipeline_workers": []}
        shapes: dict = {}
        shapes_device: dict = {}
        stage_runs: dict[str, list[dict]] = {"loader": [], "device": []}
        inter: dict[str, list[dict]] = {"loader": [], "device": []}
        for r in range(args.repeats):
            runs["raw_pil_decode"].append(bench_raw(blobs))
            rate, shapes = bench_pipeline(cfg(0))
            runs["pipeline_inproc"].append(rate)
            rate, shapes_device = bench_pipeline(cfg(0, "device"))
            runs["pipeline_inproc_device_normalize"].append(rate)
            runs["pipeline_1_worker_device_normalize"].append(bench_pipeline(cfg(1, "device"))[0])
            runs["pipeline_workers"].append(bench_pipeline(cfg(args.workers))[0])
            print(f"run {r}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items()), flush=True)
            for mode in ("loader", "device"):
                stage_runs[mode].append(stage_times(pattern, cfg(0, mode)))
                inter[mode].append(bench_interleaved(blobs, cfg(0, mode)))
            print(f"  interleaved pipeline / raw decode: {inter['loader'][-1]} (loader), "
                  f"{inter['device'][-1]} (device)", flush=True)
            print(f"  stages ms/sample (normalize=loader): {stage_runs['loader'][-1]}", flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    W = max(1, args.workers)
    result = {
        "benchmark": "data_pipeline",
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__,
                     "webdataset": getattr(webdataset, "__version__", "?")},
        "data": {"samples": args.count, "jpeg_shorter_side": args.short_side,
                 "jpeg_quality": args.quality, "aspects_w_h": [f"{w}:{h}" for w, h in ASPECTS],
                 "mean_jpeg_kib": round(float(np.mean(jpeg_bytes)) / 1024, 1),
                 "bits_per_pixel": round(bpp, 2), "max_regions": args.max_regions,
                 "regions_per_image": "2-6", "tokenizer": "clip_bpe", "context_length": 77,
                 "jpeg_draft": not args.no_draft, "shuffle_buffer": 256},
        "batch_size": args.batch_size,
        "shapes": {"normalize=loader": shapes, "normalize=device": shapes_device},
        "samples_per_s": {
            "raw_pil_decode": round(med["raw_pil_decode"], 1),
            "pipeline_inproc_per_worker": round(med["pipeline_inproc"], 1),
            "pipeline_inproc_per_worker_device_normalize": round(med["pipeline_inproc_device_normalize"], 1),
            "pipeline_1_worker_device_normalize": round(med["pipeline_1_worker_device_normalize"], 1),
            f"pipeline_{W}_workers_total": round(med["pipeline_workers"], 1),
            f"pipeline_{W}_workers_per_worker": round(med["pipeline_workers"] / W, 1),
        },
        "pipeline_over_raw_decode": {
            "per_worker_inproc": round(med["pipeline_inproc"] / med["raw_pil_decode"], 3),
            "per_worker_inproc_device_normalize": round(
                med["pipeline_inproc_device_normalize"] / med["raw_pil_decode"], 3),
            "per_worker_1_worker_device_normalize": round(
                med["pipeline_1_worker_device_normalize"] / med["raw_pil_decode"], 3),
            f"per_worker_{W}_workers": round(med["pipeline_workers"] / W / med["raw_pil_decode"], 3),
        },
        "stage_ms_per_sample": {
            "note": ("each stage timed separately on every sample (one thread, in order, no "
                     "shuffle), median over repeats; raw_pil_decode is 1000 / its samples/s"),
            "raw_pil_decode": round(1e3 / med["raw_pil_decode"], 3),
            **{f"normalize={mode}": {k: round(statistics.median(r[k] for r in runs_), 3)
                                     for k in runs_[0]} for mode, runs_ in stage_runs.items()},
        },
        "pipeline_over_raw_decode_paired": {
            "note": "median over repeats of (pipeline / raw decode of the same repeat): steadier "
                    "when the shared machine's load drifts between repeats",
            **paired(runs, W),
        },
        "pipeline_over_raw_decode_interleaved": {
            "note": ("in-process pipeline batches and raw decodes of as many JPEGs taking turns "
                     "(bench_interleaved): each pair meets the same machine load. 'epoch': total "
                     "raw time / total pipeline time over the epoch; 'median_pair': the median pair's "
                     "ratio; each the median over repeats"),
            **{f"per_worker_inproc{'' if mode == 'loader' else '_device_normalize'}": {
                "epoch": round(statistics.median(r["epoch"] for r in runs_), 3),
                "median_pair": round(statistics.median(r["median_pair"] for r in runs_), 3)}
               for mode, runs_ in inter.items()},
            "runs": {mode: [{k: round(v, 3 if v < 10 else 1) for k, v in r.items()} for r in runs_]
                     for mode, runs_ in inter.items()},
        },
        "repeats": args.repeats,
        "runs": runs,
        "note": ("2-core CPU shared with other jobs: numbers are noisy, medians of the repeats; "
                 "with 2 workers the main process competes with the workers for the 2 cores"),
    }
    if args.before:
        with open(args.before) as f:
            prev = json.load(f)
        result["before"] = {"what": args.before_label, "samples_per_s": prev["samples_per_s"],
                            "pipeline_over_raw_decode": prev["pipeline_over_raw_decode"],
                            "pipeline_over_raw_decode_paired": paired(prev["runs"], W),
                            "pipeline_over_raw_decode_interleaved":
                                prev.get("pipeline_over_raw_decode_interleaved"),
                            "runs": prev["runs"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result["samples_per_s"]), json.dumps(result["pipeline_over_raw_decode"]),
          "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
