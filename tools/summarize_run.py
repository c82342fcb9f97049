#!/usr/bin/env python
"""Print the evaluations (zero-shot, image/text and region retrieval) and the first/last
logged loss of runs (their run_dir's metrics.jsonl, as trainer/train.py writes it).

  python tools/summarize_run.py runs/smoke/dense runs/smoke/moe
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.eval import format_metrics  # noqa: E402  (cheap: no torch)


def read(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for run_dir in argv:
        rows = read(run_dir)
        losses = [r for r in rows if "loss" in r]
        print(f"{run_dir}:")
        if losses:
            print(f"  loss: step {losses[0]['step']} {losses[0]['loss']:.4f} -> step "
                  f"{losses[-1]['step']} {losses[-1]['loss']:.4f}")
        for r in rows:
            m = {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
            if m:
                print(f"  step {r['step']:>5}: {format_metrics(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
