#!/usr/bin/env bash
# ILVR on one GPU, in one run that fits a 10-minute device call (an H200 here):
#   1. training throughput of a Qwen2.5-VL-3B-shaped model (bench/gpu.py): stage 1 padded / packed and
#      stage 2 plain / per-call checkpointed, batch 1 and 4: tokens/s, MFU, peak GPU memory;
#   2. latent vs pixel-level interleaved inference (bench/inference.py) at batch 1 and 32, 3B shapes, bf16.
#
#   bash bench/gpu.sh --fetch   # here (with PyPI): the wheels the device image lacks, into .whl/
#   bash bench/gpu.sh           # there: installs .whl/*.whl into /tmp/site, runs both, JSON into $OUT (or runs/gpu)
#   bash bench/gpu.sh --smoke   # anywhere, CPU, ~1 minute: the same code on a tiny model (CI runs it)
#
# It carries one package: gymnasium (its FrozenLake sprites draw the VSP maps; pure Python). torch,
# transformers, tokenizers, safetensors, pillow and numpy are on the device image; one GPU needs no
# DeepSpeed, so deepspeed, webdataset and mlflow are not used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-runs/gpu}
mkdir -p "$OUTDIR"
case "${1:-}" in
  --fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
      'gymnasium==1.3.0' 'farama-notifications==0.0.4'
    ls -l .whl
    exit 0 ;;
  --smoke)
    "$PY" -m bench.gpu --smoke --json "$OUTDIR/train_smoke.json"
    "$PY" -m bench.inference --quick --out "$OUTDIR/inference_smoke.json"
    exit 0 ;;
esac
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
timeout 330 "$PY" -m bench.gpu --json "$OUTDIR/train.json" 2>&1 | tee "$OUTDIR/train.log"
timeout 200 "$PY" -m bench.inference --device cuda --dtype bf16 --hidden 2048 --layers 36 --vision-hidden 1280 \
  --vision-depth 32 --batch-sizes 1 32 --segments 1 3 6 --repeats 3 --out "$OUTDIR/inference.json" 2>&1 \
  | tee "$OUTDIR/inference.log"
