#!/usr/bin/env python
"""Zero-shot evaluation cost at ImageNet scale on CPU: the classifier (class prompts through
the text tower) and the scoring (top-1/5, mean per-class recall) of trainer/eval/zeroshot.py.

  python bench/zero_shot.py [--classes 1000 --templates 80 --images 50000 --repeats 3]
  python bench/zero_shot.py --before-ref a7523b2     # that commit's classifier, same run
  python bench/zero_shot.py --before OLD.json --before-label 'commit abc123'

What runs (made here: no download; the numbers do not depend on trained weights):
  classifier      ``classifier(model.encode_text, tokenizer, names, templates)``: open_clip's
                  ImageNet class names x OpenAI's 80 templates (the built-in ``imagenet`` /
                  ``openai_imagenet``, cut to --classes / --templates), CLIP BPE, the tiny
                  preset's text tower (trainer/hub.py plain model, 16-token context, random
                  weights) projected to --embed-dim (768: ViT-L/14's), fp32. ``tokenize`` is
                  the tokenizer's share of it, timed alone on a fresh tokenizer.
                  Each classifier runs in a fresh subprocess: ``classifier`` is a first eval
                  (a fresh tokenizer), ``classifier_second_eval`` a second one with the same
                  tokenizer (as the in-training hook calls it every eval.every steps),
                  ``..._besides_text_tower`` that minus the time inside encode_text (the
                  tokenizer's and the averaging's share: the tower's own time swings by
                  +-0.5 s with the host's load), and
                  ``classifier_peak_rss_mb`` the peak resident memory of the first eval above
                  the process's resident memory just before it (Linux VmHWM, reset through
                  /proc/self/clear_refs: it sees torch's CPU tensors, which tracemalloc does not).
  zero_shot_topk  ``zero_shot_topk(image, labels, weights)``: --images L2-normalised random
                  embeddings with uniform random labels over --classes (5% unlabelled, -1),
                  against the classifier's weights.
Seconds are the median of --repeats (the classifier: of 2 processes x min(--repeats, 2) evals,
the working tree's and --before-ref's processes alternating), torch threads as given by
OMP_NUM_THREADS. --before-ref REF measures the classifier of trainer/eval/zeroshot.py
as of git commit REF in the same run (its weights must equal the current code's: the JSON says
``weights_equal``) and records it under "before"; --before PATH instead copies an earlier
run's seconds.

Writes bench/results/zero_shot_cpu.json (CPU model, versions, sizes, seconds).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
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


def status_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux /proc/self/status)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def classifier_at(ref: str):
    """``classifier`` of trainer/eval/zeroshot.py: as of git commit ``ref``, or the working
    tree's when ``ref`` is empty."""
    if not ref:
        from trainer.eval.zeroshot import classifier
        return classifier
    path = "trainer/eval/zeroshot.py"
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:{path}"], check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType(f"zeroshot_at_{ref}")
    exec(compile(src, f"{ref}:{path}", "exec"), module.__dict__)
    return module.classifier


def tiny_text_tower(embed_dim: int):
    """The tiny preset's plain model with N(0, 0.2) weights (hub.UpCLIPModel starts at zero:
    every class row would be 0), ``embed_dim`` wide embeddings."""
    from trainer import hub
    from trainer.config import ModelConfig

    cfg = ModelConfig()
    cfg.embed_dim = embed_dim
    torch.manual_seed(0)
    model = hub.UpCLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return cfg, model


def measure_classifier(args) -> dict:
    """(In a fresh process) one classifier's first and second eval and the first's peak."""
    from trainer.data.tokenizer import ClipBPETokenizer
    from trainer.eval.names import builtin_classnames, builtin_templates

    names = builtin_classnames("imagenet")[:args.classes]
    templates = builtin_templates("openai_imagenet")[:args.templates]
    cfg, model = tiny_text_tower(args.embed_dim)
    classifier = classifier_at(args.ref)
    first, second, besides, peak = [], [], [], None
    in_tower = [0.0]

    def encode_text(tokens):  # the text tower, timed
        t0 = time.perf_counter()
        out = model.encode_text(tokens)
        in_tower[0] += time.perf_counter() - t0
        return out

    for _ in range(min(args.repeats, 2)):
        tok = ClipBPETokenizer(context_length=cfg.text.context_length)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
            f.write("5")
        rss = status_kb("VmRSS")
        t0 = time.perf_counter()
        weights = classifier(encode_text, tok, names, templates)
        first.append(time.perf_counter() - t0)
        if peak is None:
            peak = (status_kb("VmHWM") - rss) / 1024
        in_tower[0], t0 = 0.0, time.perf_counter()
        again = classifier(encode_text, tok, names, templates)
        second.append(time.perf_counter() - t0)
        besides.append(second[-1] - in_tower[0])
        assert torch.equal(again, weights)
        del tok
    torch.save(weights, args.weights_out)
    return {"classifier": first, "classifier_second_eval": second,
            "classifier_second_eval_besides_text_tower": besides,
            "classifier_peak_rss_mb": [peak]}


def classifier_in_subprocess(args, ref: str) -> tuple[dict, torch.Tensor]:
    """``measure_classifier`` of ``ref`` (the working tree when empty) in a fresh process:
    its samples and the classifier weights."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "weights.pt"
        cmd = [sys.executable, __file__, "--measure-classifier", "--ref", ref,
               "--weights-out", str(out), "--classes", str(args.classes), "--templates",
               str(args.templates), "--embed-dim", str(args.embed_dim), "--repeats",
               str(args.repeats)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(out)


def classifiers(args, refs: list[str], rounds: int = 2) -> dict:
    """``{ref: (medians, weights)}``: each ref's classifier measured ``rounds`` times in fresh
    processes, the refs alternating (a host whose load drifts then biases none of them)."""
    samples: dict = {ref: {} for ref in refs}
    weights = {}
    for _ in range(rounds):
        for ref in refs:
            got, weights[ref] = classifier_in_subprocess(args, ref)
            for k, v in got.items():
                samples[ref].setdefault(k, []).extend(v)
    return {ref: ({k: statistics.median(v) for k, v in samples[ref].items()}, weights[ref])
            for ref in refs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--templates", type=int, default=80)
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--embed-dim", type=int, default=768, help="the text projection's width")
    ap.add_argument("--out", default=str(REPO / "bench/results/zero_shot_cpu.json"))
    ap.add_argument("--before", default="", help="JSON of an earlier run whose seconds are "
                    "copied under 'before'")
    ap.add_argument("--before-label", default="", help="what --before measured (a commit)")
    ap.add_argument("--before-ref", default="", help="git commit whose classifier is measured "
                    "in this run under 'before'")
    ap.add_argument("--measure-classifier", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ref", default="", help=argparse.SUPPRESS)
    ap.add_argument("--weights-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_classifier:
        print(json.dumps(measure_classifier(args)))
        return 0

    from trainer.data.tokenizer import ClipBPETokenizer
    from trainer.eval.names import builtin_classnames, builtin_templates
    from trainer.eval.zeroshot import zero_shot_topk

    names = builtin_classnames("imagenet")[:args.classes]
    templates = builtin_templates("openai_imagenet")[:args.templates]
    cfg, _ = tiny_text_tower(args.embed_dim)
    L = cfg.text.context_length
    prompts = [t.format(n) for n in names for t in templates]
    seconds = {}
    t0 = time.perf_counter()
    ClipBPETokenizer(context_length=L)(prompts)
    seconds["tokenize"] = time.perf_counter() - t0
    runs = classifiers(args, ["", args.before_ref] if args.before_ref else [""])
    measured, weights = runs[""]
    peak = measured.pop("classifier_peak_rss_mb")
    seconds.update(measured)
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
        "classifier_peak_rss_mb": round(peak, 1),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    if args.before_ref:
        measured, old = runs[args.before_ref]
        result["before"] = {
            "what": args.before_label or f"classifier of {args.before_ref}, measured in this run",
            "seconds": {k: round(v, 4) for k, v in measured.items() if k.startswith("classifier")
                        and not k.endswith("_mb")},
            "classifier_peak_rss_mb": round(measured["classifier_peak_rss_mb"], 1),
            "weights_equal": bool(torch.equal(old, weights)),
            "weights_max_abs_diff": float((old - weights).abs().max()),
            "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    elif args.before:
        prev = json.loads(Path(args.before).read_text())
        result["before"] = {"what": args.before_label, "seconds": prev["seconds"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["seconds"]), json.dumps(result.get("before", {})), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
