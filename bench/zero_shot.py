#!/usr/bin/env python
"""Zero-shot evaluation cost at ImageNet scale on CPU: the classifier (class prompts through
the text tower) and the scoring (top-1/5, mean per-class recall) of trainer/eval/zeroshot.py.

  python bench/zero_shot.py [--classes 1000 --templates 80 --images 50000 --repeats 3]
  python bench/zero_shot.py --before OLD.json --before-label 'commit abc123'

What runs (made here: no download; the numbers do not depend on trained weights):
  classifier      ``classifier(model.encode_text, tokenizer, names, templates)``: open_clip's
                  ImageNet class names x OpenAI's 80 templates (the built-in ``imagenet`` /
                  ``openai_imagenet``, cut to --classes / --templates), CLIP BPE, the tiny
                  preset's text tower (trainer/hub.py plain model, 16-token context, random
                  weights), fp32. ``tokenize`` is the tokenizer's share of it, timed alone
                  on a fresh tokenizer (what the classifier pays on its first call).
  zero_shot_topk  ``zero_shot_topk(image, labels, weights)``: --images L2-normalised random
                  embeddings with uniform random labels over --classes (5% unlabelled, -1),
                  against the classifier's weights.
Seconds are the median of --repeats (the classifier: of min(--repeats, 2)), torch threads as
given by OMP_NUM_THREADS. --before PATH copies an earlier run's seconds (e.g. of the previous
code) into the JSON under "before".

Writes bench/results/zero_shot_cpu.json (CPU model, versions, sizes, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.hostinfo import cpu_model  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--templates", type=int, default=80)
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results/zero_shot_cpu.json"))
    ap.add_argument("--before", default="", help="JSON of an earlier run whose seconds are "
                    "copied under 'before'")
    ap.add_argument("--before-label", default="", help="what --before measured (a commit)")
    args = ap.parse_args()

    from trainer import hub
    from trainer.config import ModelConfig
    from trainer.data.tokenizer import ClipBPETokenizer
    from trainer.eval.names import builtin_classnames, builtin_templates
    from trainer.eval.zeroshot import classifier, zero_shot_topk

    names = builtin_classnames("imagenet")[:args.classes]
    templates = builtin_templates("openai_imagenet")[:args.templates]
    cfg = ModelConfig()  # the tiny preset's sizes
    torch.manual_seed(0)
    model = hub.UpCLIPModel(cfg).eval()
    L = cfg.text.context_length
    prompts = [t.format(n) for n in names for t in templates]
    seconds = {}
    t0 = time.perf_counter()
    ClipBPETokenizer(context_length=L)(prompts)
    seconds["tokenize"] = time.perf_counter() - t0
    seconds["classifier"], weights = timed(
        lambda: classifier(model.encode_text, ClipBPETokenizer(context_length=L), names,
                           templates), min(args.repeats, 2))
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(args.images, cfg.embed_dim, generator=g), dim=-1)
    labels = torch.randint(0, len(names), (args.images,), generator=g)
    labels[torch.rand(args.images, generator=g) < 0.05] = -1
    seconds["zero_shot_topk"], metrics = timed(lambda: zero_shot_topk(image, labels, weights),
                                               args.repeats)
    result = {
        "benchmark": "zero_shot", "device": "cpu", "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "sizes": {"classes": len(names), "templates": len(templates), "prompts": len(prompts),
                  "context_length": L, "text_width": cfg.text.width,
                  "text_layers": cfg.text.layers, "embed_dim": cfg.embed_dim,
                  "images": args.images, "labelled": metrics["zero_shot_images"]},
        "repeats": args.repeats,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    if args.before:
        prev = json.loads(Path(args.before).read_text())
        result["before"] = {"what": args.before_label, "seconds": prev["seconds"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["seconds"]), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
