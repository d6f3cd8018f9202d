#!/usr/bin/env bash
# Evaluation sweep on Slurm: one array element per checkpoint (loaded once, then every benchmark x mode),
# then a summary job.
#
#   bash slurm/eval_sweep.sh --out runs/sweeps/s1 --checkpoint-glob 'runs/x/checkpoints/step-*' \
#       --benchmark vsp=shards/vsp_test [--modes latent text] [--max-parallel 8] [--wait] [--sbatch --partition=gpu]
#
# On the submit host it runs `python -m ilvr.evaluate sweep plan` (every option not listed below goes to it:
# --checkpoints/--checkpoint-list/--checkpoint-glob, --benchmark, --modes, --limit, --max-new-tokens,
# --batch-size, --tracking-uri, --experiment), then submits
#   an array job:  one element per checkpoint task, `sweep task --index $SLURM_ARRAY_TASK_ID` (the checkpoint is
#                  consolidated once and evaluated on every benchmark x mode), at most --max-parallel at once
#   a summary job: `sweep summary`, after the whole array (afterany: a failed task is listed, not hidden)
# Own options: --out DIR (required), --max-parallel N, --wait (block until the summary job ends; exit with
# its status), --sbatch ARG (extra sbatch flag for both jobs, repeatable). Knobs: docs/slurm.md.
# Relative paths are relative to the current directory, for the jobs too (they run there).
set -euo pipefail

log() { echo "[eval_sweep.sh $(date +%H:%M:%S)] $*"; }
die() { echo "[eval_sweep.sh] error: $*" >&2; exit 2; }

# Under sbatch this file runs from a spool copy: the repository comes from ILVR_REPO (exported below).
REPO=${ILVR_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/ilvr/evaluate.py" ] || die "$REPO is not the ILVR-train repository (set ILVR_REPO)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${ILVR_PYTHON:-}" ]; then PY=$ILVR_PYTHON
elif [ -n "${ILVR_VENV:-}" ]; then PY=$ILVR_VENV/bin/python
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
command -v "$PY" >/dev/null || die "python '$PY' not found: set ILVR_PYTHON (or ILVR_VENV)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# ---------------------------------------------------------------- inside the jobs
case ${1:-} in
  --task)  # one array element
    SWEEP=${2:?--task needs the sweep dir}
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "--task runs inside a job array (SLURM_ARRAY_TASK_ID is unset)"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    log "task $SLURM_ARRAY_TASK_ID of sweep $SWEEP on ${SLURMD_NODENAME:-?} (job ${SLURM_JOB_ID:-?})"
    exec "$PY" -m ilvr.evaluate sweep task --sweep "$SWEEP" --index "$SLURM_ARRAY_TASK_ID" ;;
  --summary)  # after the array; its exit status is kept for --wait
    SWEEP=${2:?--summary needs the sweep dir}
    set +e
    "$PY" -m ilvr.evaluate sweep summary --sweep "$SWEEP"
    RC=$?
    set -e
    echo "$RC" > "$SWEEP/logs/summary.rc"
    exit "$RC" ;;
esac

# ---------------------------------------------------------------- on the submit host
SWEEP=""
MAX_PARALLEL=${ILVR_EVAL_MAX_PARALLEL:-8}
WAIT=${ILVR_EVAL_WAIT:-0}
read -r -a SBATCH_EXTRA <<< "${ILVR_SBATCH_ARGS:-}"
PLAN_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) SWEEP=${2:?--out needs a directory}; shift 2 ;;
    --out=*) SWEEP=${1#--out=}; shift ;;
    --max-parallel) MAX_PARALLEL=${2:?--max-parallel needs a number}; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --sbatch) SBATCH_EXTRA+=("${2:?--sbatch needs a flag, e.g. --sbatch --partition=gpu}"); shift 2 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) PLAN_ARGS+=("$1"); shift ;;
  esac
done
[ -n "$SWEEP" ] || die "give --out SWEEP_DIR (see --help)"
[[ $MAX_PARALLEL =~ ^[1-9][0-9]*$ ]] || die "--max-parallel $MAX_PARALLEL: give a positive number"
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm submit host"
SWEEP=$(realpath -m "$SWEEP")

log "planning the sweep in $SWEEP"
PLAN_OUT=$("$PY" -m ilvr.evaluate sweep plan --out "$SWEEP" "${PLAN_ARGS[@]}") \
  || die "sweep plan failed (above); nothing was submitted"
[ -z "$PLAN_OUT" ] || echo "$PLAN_OUT"
N=$(tail -n 1 <<< "$PLAN_OUT")
[[ $N =~ ^[1-9][0-9]*$ ]] || die "sweep plan printed '$N' as its last line, not a task count"
mkdir -p "$SWEEP/logs"
rm -f "$SWEEP/logs/summary.rc"

# Resources of each evaluation job (one process each); GPUs 0 = CPU-only.
GPUS=${ILVR_EVAL_GPUS:-1}
RES=(--nodes=1 --ntasks=1 --cpus-per-task="${ILVR_EVAL_CPUS:-8}" --time="${ILVR_EVAL_TIME:-04:00:00}")
[ "$GPUS" = 0 ] || RES+=(--gpus="$GPUS")
export ILVR_REPO=$REPO ILVR_PYTHON=$PY  # the jobs run a spool copy of this file and find both here
SELF="$REPO/slurm/eval_sweep.sh"

ARRAY_JOB=$(sbatch --parsable --job-name=ilvr-eval --array="0-$((N - 1))%$MAX_PARALLEL" "${RES[@]}" \
  --chdir="$PWD" --output="$SWEEP/logs/task-%a.out" "${SBATCH_EXTRA[@]}" "$SELF" --task "$SWEEP")
ARRAY_JOB=${ARRAY_JOB%%;*}
SUMMARY_JOB=$(sbatch --parsable --job-name=ilvr-eval-summary --dependency="afterany:$ARRAY_JOB" \
  --nodes=1 --ntasks=1 --cpus-per-task=1 --time=00:30:00 --chdir="$PWD" --output="$SWEEP/logs/summary.out" \
  "${SBATCH_EXTRA[@]}" "$SELF" --summary "$SWEEP")
SUMMARY_JOB=${SUMMARY_JOB%%;*}
log "array job $ARRAY_JOB: $N task(s), at most $MAX_PARALLEL at once; logs $SWEEP/logs/task-<i>.out"
log "summary job $SUMMARY_JOB (after the array): $SWEEP/summary.md, $SWEEP/summary.csv"
echo "ARRAY_JOB=$ARRAY_JOB"
echo "SUMMARY_JOB=$SUMMARY_JOB"
[ "$WAIT" = 1 ] || exit 0

# ---------------------------------------------------------------- --wait
log "waiting for summary job $SUMMARY_JOB"
# The summary job writes summary.rc; stop early only when Slurm says the job is gone or ended. A failing
# squeue (a busy controller) is retried, not taken as the end.
while [ ! -f "$SWEEP/logs/summary.rc" ]; do
  if STATE=$(squeue -h -j "$SUMMARY_JOB" -o %T 2>&1); then
    case $STATE in ""|COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE) break ;; esac
  elif [[ $STATE == *"Invalid job id"* ]]; then
    break  # purged from the queue after MinJobAge
  fi
  sleep 3
done
sleep 1  # the job's last write may trail its end state
[ -f "$SWEEP/logs/summary.rc" ] || die "summary job $SUMMARY_JOB ended without a result: see $SWEEP/logs/summary.out"
RC=$(cat "$SWEEP/logs/summary.rc")
[ ! -f "$SWEEP/summary.md" ] || cat "$SWEEP/summary.md"
[ "$RC" = 0 ] || echo "[eval_sweep.sh] error: some tasks have no result (see $SWEEP/logs/task-<i>.out)" >&2
exit "$RC"
