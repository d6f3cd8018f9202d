#!/usr/bin/env bash
# Try the newest releases on purpose, not by accident: a venv (.venv-compat) with the newest versions setup.py
# allows (torch stays the CPU build 2.13.0), then the short end-to-end smoke: the tests marked `compat`
# (2 ranks, ZeRO-3, student + teacher built as the trainer builds them, stage 1+2 in bf16, fp32 and fp16,
# checkpoint, resume, export, evaluation). ~6-10 minutes on 2 CPU cores. The result (date, versions,
# passed/failed) is written to docs/compat.md.
#   --full        run the whole test suite in that venv instead of the smoke
#   --write-lock  after a passing --full run, make its versions the tested set (scripts/constraints-cpu.txt)
# Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${ILVR_COMPAT_VENV:-.venv-compat}
FULL=0 LOCK=0 ARGS=()
for a in "$@"; do
  case "$a" in
    --full) FULL=1 ;;
    --write-lock) LOCK=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
if [ "$LOCK" = 1 ] && [ "$FULL" = 0 ]; then
  echo "compat: --write-lock needs --full (the lock records what the whole suite passed with)" >&2
  exit 2
fi
started=$(date +%s)
ILVR_VENV="$VENV" ILVR_CONSTRAINTS=none bash scripts/setup.sh || { echo "compat: installing the newest releases failed" >&2; exit 1; }
if [ "$FULL" = 1 ]; then SELECT=(); WHAT="the whole test suite"; else SELECT=(-m compat); WHAT="the compat smoke (pytest -m compat)"; fi
LOG="$VENV/compat-pytest.log"
ILVR_VENV="$VENV" ILVR_CONSTRAINTS=none bash scripts/test.sh -q -p no:cacheprovider "${SELECT[@]}" "${ARGS[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
"$VENV/bin/python" scripts/compat_record.py --venv "$VENV" --log "$LOG" --rc "$rc" --what "$WHAT" \
  --seconds $(( $(date +%s) - started )) --out docs/compat.md
if [ "$rc" = 0 ] && [ "$LOCK" = 1 ]; then
  "$VENV/bin/python" scripts/compat_record.py --venv "$VENV" --write-lock scripts/constraints-cpu.txt
  echo "compat: scripts/constraints-cpu.txt now pins what $VENV passed with; rebuild .venv with bash scripts/setup.sh"
fi
exit "$rc"
