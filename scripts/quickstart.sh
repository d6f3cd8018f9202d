#!/usr/bin/env bash
# The main job end to end on this CPU machine:
# data -> shards -> tiny processor -> ZeRO-3 training on 2 ranks (stage 1 -> stage 2) -> MLflow -> export
# -> evaluation (exported model; checkpoints x decoding modes as an MLflow sweep) -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${ILVR_VENV:-.venv}
PY="$VENV/bin/python"
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions" TOKENIZERS_PARALLELISM=false
OUT=runs/quickstart
CONFIG=configs/quickstart.yaml   # why these settings: the comments in it, and docs/method.md

echo "== 1. synthetic VSP data (3x3 maps; 'Move R.' + a latent step per move) -> WebDataset shards"
"$PY" -m data_pipeline.prepare --source synthetic --style latent-moves --num-samples 2000 --seed 0 --min-size 3 \
  --max-size 3 --question short --out "$OUT/shards/train" --prefix train --samples-per-shard 250 --no-progress \
  --overwrite
"$PY" -m data_pipeline.prepare --source synthetic --style latent-moves --num-samples 64 --seed 1 --min-size 3 \
  --max-size 3 --question short --out "$OUT/shards/eval" --prefix eval --samples-per-shard 32 --no-progress \
  --overwrite

echo "== 2. tiny Qwen2.5-VL processor trained on the shards' text (patch 32: one merged token per 64 px square;"
echo "   no default system message: docs/method.md says why)"
"$PY" -m data_pipeline.tiny_processor --shards "$OUT/shards/train" --out "$OUT/processor" \
  --patch-size 32 --min-pixels 36864 --max-pixels 262144 --system-prompt ""

echo "== 3. the batches each of 2 ranks will stream"
"$PY" -m ilvr.data_preview --config "$CONFIG" --world-size 2 --batches 2

echo "== 4. DeepSpeed ZeRO-3 training on 2 ranks: stage 1 (momentum teacher) then stage 2"
echo "   (the trainer's lines: step N/M with ETA and samples/s; everything rank 0 logs: $OUT/train/train.log)"
rm -rf "$OUT/train"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shown: the project's own log lines (loggers ilvr.*); everything, DeepSpeed's and torch's chatter included, goes
# to $OUT/train.console.log, and on a failure the failing ranks' tracebacks are printed from the run's log
"$VENV/bin/deepspeed" --num_gpus 2 --master_port "$PORT" ilvr/train.py --deepspeed ds_configs/zero3.json \
  --config "$CONFIG" --resume never "$@" 2>&1 | tee "$OUT/train.console.log" \
  | grep --line-buffered -E "(INFO|WARNING) ilvr\.|^ilvr-train:" || true
if ! test -f "$OUT/train/checkpoints/latest"; then
  "$PY" -m ilvr.training.log_errors "$OUT/train/train.log" "$OUT/train.console.log"
  echo "quickstart: training failed (no checkpoint). Logs: $OUT/train/train.log (rank 0, every rank's errors)," \
    "$OUT/train.console.log (everything)"
  exit 1
fi

echo "== 5. MLflow: one SQLite store for the whole experiment, $OUT/train/mlflow.db (the evaluations below log there too)"
"$PY" -m ilvr.training.tracking "$OUT/train"

echo "== 6. export the last checkpoint as a Hugging Face directory"
rm -rf "$OUT/export"
"$PY" -m ilvr.export --checkpoint "$OUT/train" --out "$OUT/export"

echo "== 7. evaluate the exported model on held-out VSP maps (decoding settings: the recipe's eval section)"
rm -rf "$OUT/eval"
"$PY" -m ilvr.evaluate run --model "$OUT/export" --config "$CONFIG" --limit 64 --out "$OUT/eval/export" \
  2>&1 | grep --line-buffered -E "ilvr\.evaluation|Error|error|^\{" || true
test -f "$OUT/eval/export/metrics.json" || { echo "quickstart: evaluation failed"; exit 1; }

echo "== 7b. the same maps with every latent replaced by one constant vector: do the answers use the latents?"
"$PY" -m ilvr.evaluate run --model "$OUT/export" --config "$CONFIG" --limit 64 --mode constant-latent \
  --out "$OUT/eval/export-constant" 2>&1 | grep --line-buffered -E "Error|error" || true
test -f "$OUT/eval/export-constant/metrics.json" || { echo "quickstart: the constant-latent evaluation failed"; exit 1; }

echo "== 8. sweep: the kept checkpoints x {latent, text, constant-latent} as MLflow child runs of one parent"
SWEEP_RC=0
"$PY" -m ilvr.evaluate sweep run --out "$OUT/eval/sweep" --checkpoint-glob "$OUT/train/checkpoints/step-*" \
  --benchmark "vsp=$OUT/shards/eval" --modes latent text constant-latent --limit 32 --max-new-tokens 64 \
  --batch-size 32 > "$OUT/eval/sweep.log" 2>&1 || SWEEP_RC=$?
grep -E "ilvr\.evaluation\.(evaluate|sweep)|Error|error" "$OUT/eval/sweep.log" | grep -v " decoded " || true
[ "$SWEEP_RC" -eq 0 ] || { echo "quickstart: the sweep failed (exit $SWEEP_RC; see $OUT/eval/sweep.log)"; exit 1; }
cat "$OUT/eval/sweep/summary.md"

echo "== 9. report: training curves, accuracy per step / mode / level with 95% intervals, the export, samples"
"$PY" -m ilvr.evaluation.report --run "$OUT/train" --out "$OUT/eval/report.html" >/dev/null
"$PY" - "$OUT/eval/export" "$OUT/eval/export-constant" <<'PYEOF'
import json, sys
from ilvr.evaluation.paired import compare_dirs
from ilvr.evaluation.scorers import describe_plan_lengths
result = json.load(open(sys.argv[1] + "/metrics.json"))
m = result["metrics"]
print(f"quickstart: solved, by the length of the map's shortest plan: {describe_plan_lengths(result['by_plan_length'])}")
p = compare_dirs(sys.argv[1], sys.argv[2])
print(f"quickstart: the exported model on {m['num_samples']:.0f} held-out 3x3 maps: success {100 * m['accuracy']:.1f}% "
      f"(unparseable {100 * m['unparseable_rate']:.1f}%) | constant latents: {100 * p['b_success']:.1f}% "
      f"(paired on the same maps: solved only with the latents {p['only_a']}, only with the constant {p['only_b']}; "
      f"exact McNemar "
      f"p = {p['p_value']:.2g}) | a random valid plan: {100 * m['baseline']:.1f}%")
PYEOF
echo "quickstart: done. Outputs in $OUT/. Where to look:"
echo "  report (one HTML file, opens offline): $OUT/eval/report.html"
echo "  MLflow UI (training, its evaluations and the sweep, one store):"
echo "    $VENV/bin/mlflow ui --backend-store-uri sqlite:///$PWD/$OUT/train/mlflow.db   # then http://127.0.0.1:5000"
