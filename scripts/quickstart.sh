#!/usr/bin/env bash
# The main job end to end on this CPU machine: data -> shards -> tiny processor -> streamed batches.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ILVR_VENV:-.venv}
PY="$VENV/bin/python"
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" TOKENIZERS_PARALLELISM=false
OUT=runs/quickstart
CONFIG=configs/tiny_cpu.yaml

echo "== 1. synthetic VSP data -> WebDataset shards"
"$PY" -m data_pipeline.prepare --source synthetic --num-samples 512 --seed 0 --max-size 6 \
  --out "$OUT/shards/train" --prefix train --samples-per-shard 64 --no-progress
"$PY" -m data_pipeline.prepare --source synthetic --num-samples 64 --seed 1 --max-size 6 \
  --out "$OUT/shards/eval" --prefix eval --samples-per-shard 32 --no-progress

echo "== 2. tiny Qwen2.5-VL processor trained on the shards' text"
"$PY" -m data_pipeline.tiny_processor --shards "$OUT/shards/train" --out "$OUT/processor"

echo "== 3. stream training batches on 2 ranks"
"$PY" -m data_pipeline.preview --config "$CONFIG" --world-size 2 --batches 8 "$@"
echo "quickstart: done (outputs in $OUT)"
