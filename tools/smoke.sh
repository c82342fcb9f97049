#!/usr/bin/env bash
# `make smoke`: the whole UpCLIP flow on a fresh CPU machine (2 processes).
#  1. Fashion-MNIST shards (Debian's dataset-fashion-mnist) with one region per image (the
#     garment's box), and the class-labelled test split for zero-shot evaluation;
#  2. a tiny dense CLIP trained with the CLIP + CLOC region losses (data-parallel, 2 ranks);
#  3. upcycled to MoE (E=4, top-2, every other block, both towers) and trained on with EP=2;
#  4. zero-shot accuracy before and after each phase, and a checkpoint of each.
# Env: SMOKE_OUT (runs/smoke), SMOKE_DATA (data/smoke), SMOKE_DENSE_STEPS (150),
# SMOKE_MOE_STEPS (100), SMOKE_TRAIN_SAMPLES (8000), SMOKE_EVAL_SAMPLES (1000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${SMOKE_OUT:-runs/smoke}
DATA=${SMOKE_DATA:-data/smoke}
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=2 -m trainer.train --config configs/smoke.yaml"
COMMON="data.train_urls=$DATA/fmnist-train data.eval_urls=$DATA/fmnist-eval"

if [ ! -f "$DATA/fmnist-train/dataset.json" ]; then
  rm -rf "$DATA/fmnist-train"
  $PY tools/make_shards.py fashion-mnist --out "$DATA/fmnist-train" --split train \
    --count "${SMOKE_TRAIN_SAMPLES:-8000}" --shard-size 1000 --regions box
fi
if [ ! -f "$DATA/fmnist-eval/dataset.json" ]; then
  rm -rf "$DATA/fmnist-eval"
  $PY tools/make_shards.py fashion-mnist --out "$DATA/fmnist-eval" --split test \
    --count "${SMOKE_EVAL_SAMPLES:-1000}" --shard-size 500 --regions box
fi
rm -rf "$OUT"

echo "== smoke 1/2: dense CLIP + CLOC, 2 data-parallel ranks"
$RUN $COMMON model.vision.moe.num_experts=0 model.text.moe.num_experts=0 parallel.ep=1 \
  train.steps="${SMOKE_DENSE_STEPS:-150}" run_dir="$OUT/dense" checkpoint.save_dir="$OUT/dense/ckpt"

echo "== smoke 2/2: upcycled to MoE (E=4, top-2, every other block), EP=2"
$RUN $COMMON checkpoint.upcycle_from="$OUT/dense/ckpt" train.steps="${SMOKE_MOE_STEPS:-100}" \
  run_dir="$OUT/moe" checkpoint.save_dir="$OUT/moe/ckpt"

$PY tools/summarize_run.py "$OUT/dense" "$OUT/moe"
$PY tools/plot_run.py "$OUT/dense" "$OUT/moe"
