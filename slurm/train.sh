#!/usr/bin/env bash
# Multi-node ILVR training on Slurm: one torchrun per node (static rendezvous), DeepSpeed ZeRO-3,
# checkpoint on the time-limit warning, requeue, resume into the same MLflow run.
#
#   ILVR_CONFIG=configs/qwen25vl_7b_vsp.yaml sbatch -N 4 --time=12:00:00 slurm/train.sh train.lr=2e-5
#
# ILVR_CONFIG (the recipe) is required; the Python is `python3` from the submitting environment (activate
# yours before sbatch) unless ILVR_PYTHON (or ILVR_VENV) names another.
#
# Arguments are dotted config overrides. Every knob (sbatch flags and ILVR_* variables): docs/slurm.md.
# The #SBATCH lines are defaults; flags given to sbatch win over them.
#SBATCH --job-name=ilvr-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

log() { echo "[train.sh $(date +%H:%M:%S)] $*"; }
die() { echo "[train.sh] error: $*" >&2; exit 2; }

# ---------------------------------------------------------------- where, and which python
# Slurm runs a spool copy of this file, so the repository is the submit dir (or ILVR_REPO), not dirname $0.
REPO=${ILVR_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || die "cannot cd to $REPO (set ILVR_REPO)"
[ -f ilvr/train.py ] || die "$REPO is not the ILVR-train repository: sbatch from its root or set ILVR_REPO"
[ -n "${ILVR_CONFIG:-}" ] || die "ILVR_CONFIG is not set: name the recipe to train, e.g. \
ILVR_CONFIG=configs/qwen25vl_7b_vsp.yaml sbatch -N 4 slurm/train.sh (several, space-separated: later ones win)"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch slurm/train.sh'"

# The active python3 (activate your environment before sbatch: --export=ALL passes it on), or the one named.
if [ -n "${ILVR_PYTHON:-}" ]; then PY=$ILVR_PYTHON
elif [ -n "${ILVR_VENV:-}" ]; then PY=$ILVR_VENV/bin/python
else PY=python3
fi
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute, venv link kept
command -v "$PY" >/dev/null || die "python '$PY' not found: set ILVR_PYTHON (or ILVR_VENV)"

# Secrets (MLFLOW_TRACKING_PASSWORD, tokens, ...) can come from a file instead of the submit environment.
if [ -n "${ILVR_ENV_FILE:-}" ]; then
  [ -r "$ILVR_ENV_FILE" ] || die "ILVR_ENV_FILE=$ILVR_ENV_FILE is not readable"
  set -a  # every variable it sets is exported to the ranks
  # shellcheck disable=SC1090  # a user's file, named at run time
  . "$ILVR_ENV_FILE"
  set +a
fi

# ---------------------------------------------------------------- what to train
read -r -a CONFIGS <<< "$ILVR_CONFIG"   # several: later ones win
DS_CONFIG=${ILVR_DS_CONFIG:-ds_configs/zero3.json}
RESUME=${ILVR_RESUME:-auto}
read -r -a OVERRIDES <<< "${ILVR_OVERRIDES:-}"
OVERRIDES+=("$@")
[ -z "${ILVR_OUTPUT_DIR:-}" ] || OVERRIDES+=("train.output_dir=$ILVR_OUTPUT_DIR")
CONFIG_ARGS=()
for c in "${CONFIGS[@]}"; do CONFIG_ARGS+=(--config "$c"); done

# Validate the config here, once, before N nodes start; learn the output dir from it.
INFO=$("$PY" -c '
import sys
from ilvr.config import ConfigError, load_config
cut = sys.argv.index("--")
try:
    cfg = load_config(sys.argv[1:cut], sys.argv[cut + 1:])
except ConfigError as e:
    sys.exit(f"config error: {e}")
print(cfg.train.max_steps, cfg.train.output_dir)
' "${CONFIGS[@]}" -- "${OVERRIDES[@]}") || die "the training config does not load (see above): fix ILVR_CONFIG / overrides"
read -r MAX_STEPS OUTPUT_DIR <<< "$INFO"
OUTPUT_DIR=$(realpath -m "$OUTPUT_DIR")
SLURM_DIR="$OUTPUT_DIR/slurm"
LOG_DIR=${ILVR_LOG_DIR:-$SLURM_DIR/logs}
FINISHED="$OUTPUT_DIR/finished.json"   # written by the trainer when train.max_steps is reached
mkdir -p "$SLURM_DIR" "$LOG_DIR"

# ---------------------------------------------------------------- the nodes and the rendezvous
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${#NODES[@]}
export MASTER_ADDR=${ILVR_MASTER_ADDR:-${NODES[0]}}
export MASTER_PORT=${ILVR_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}  # per job, below the ephemeral range
if [ -n "${ILVR_PROCS_PER_NODE:-}" ]; then
  NPROC=$ILVR_PROCS_PER_NODE
else  # one rank per GPU; "8", "gpu:8" and "a100:8" all mean 8; no GPUs (CPU) -> 1
  GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  GPUS=${GPUS##*:}
  [[ $GPUS =~ ^[0-9]+$ ]] || die "cannot read GPUs per node from '$GPUS': set ILVR_PROCS_PER_NODE"
  NPROC=$(( GPUS > 0 ? GPUS : 1 ))
fi
CPUS=${SLURM_CPUS_PER_TASK:-1}

# ---------------------------------------------------------------- environment of the ranks
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # failed collective -> abort, not hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1      # log lines reach the per-node files as they happen
export PYTHONFAULTHANDLER=1    # a fatal signal prints every thread's Python stack
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_REQUEUES=${ILVR_MAX_REQUEUES:-3}
log "job $SLURM_JOB_ID (requeued $RESTARTS times), $NNODES node(s): ${NODES[*]}"
log "rendezvous $MASTER_ADDR:$MASTER_PORT, $NPROC rank(s) per node, OMP_NUM_THREADS=$OMP_NUM_THREADS"
log "python $PY; config ${CONFIGS[*]}; deepspeed $DS_CONFIG; resume $RESUME; output $OUTPUT_DIR"
log "overrides: ${OVERRIDES[*]:-(none)}"
MLFLOW_VARS=$(compgen -e | grep '^MLFLOW_' | tr '\n' ' ' || true)  # names only: values may be credentials
log "MLflow variables passed on: ${MLFLOW_VARS:-(none: sqlite store in the output dir)}"
log "per-node logs: $LOG_DIR/$SLURM_JOB_ID-node<i>-<host>.log"

# A requeued (or resubmitted) part may get another node count on a preemptible cluster: the trainer then
# resumes elastically (docs/training.md, "Elastic resume"); say so here, where the decision was made.
LAST_LAYOUT="$SLURM_DIR/last_layout"   # "<ranks> <nodes>" of the run's previous part
WORLD=$((NNODES * NPROC))
if [ -r "$LAST_LAYOUT" ]; then
  read -r LAST_WORLD LAST_NODES < "$LAST_LAYOUT" || true
  if [ -n "${LAST_WORLD:-}" ] && [ "$LAST_WORLD" != "$WORLD" ]; then
    log "the previous part ran on $LAST_WORLD rank(s) ($LAST_NODES node(s)), this one has $WORLD: elastic resume" \
        "(the checkpoint is converted once, beside itself, and re-partitioned)"
  fi
fi
echo "$WORLD $NNODES" > "$LAST_LAYOUT"

# ---------------------------------------------------------------- signals
# --signal=B:USR1@grace signals this shell only. srun passes USR1 on to its step, where Slurm delivers it
# to every process (torchrun and the ranks). torchrun would die of it, so it ignores USR1 (trap '' before
# exec); the trainer installs its own handler: checkpoint at the next step boundary, exit 0.
STOP=""
TERMINATED=""
SRUN_PID=""
# shellcheck disable=SC2317  # trap handlers: called by bash, not by the lines below
on_usr1() {
  STOP=USR1
  log "USR1 (time limit or preemption warning): ranks checkpoint and exit"
  [ -z "$SRUN_PID" ] || kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
# shellcheck disable=SC2317
on_term() {  # scancel, preemption or our own requeue: Slurm signals the ranks itself and decides what follows
  TERMINATED=1
  log "TERM: Slurm is ending this job"
}
trap on_usr1 USR1
trap on_term TERM

# finished.json is the trainer's: it removes a stale one when a finished run trains on (train.max_steps grew), and
# a finished run submitted again refuses to train and keeps it (this job then reports it done)
# --ntasks explicitly: a job shrunk while pending (scontrol update NumNodes=...) still inherits the submitted
# SLURM_NTASKS in Slurm 22.05, and srun would ask for that many tasks on fewer nodes and fail
# shellcheck disable=SC2016  # $0, $@ and $SLURM_NODEID expand on each node, inside bash -c
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
  --open-mode=append --output="$LOG_DIR/%j-node%n-%N.log" \
  bash -c 'trap "" USR1; exec "$0" -m torch.distributed.run --node-rank "$SLURM_NODEID" "$@"' "$PY" \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  ilvr/train.py --deepspeed "$DS_CONFIG" "${CONFIG_ARGS[@]}" --resume "$RESUME" "${OVERRIDES[@]}" &
SRUN_PID=$!
[ -z "$STOP" ] || kill -USR1 "$SRUN_PID" 2>/dev/null || true  # a USR1 that came before srun started

# `wait` returns >128 whenever a trapped signal arrives: wait again while srun still runs.
set +e
while :; do
  wait "$SRUN_PID"; RC=$?
  if [ "$RC" -le 128 ] || ! kill -0 "$SRUN_PID" 2>/dev/null; then break; fi
done
if [ "$RC" -gt 128 ]; then  # srun may have ended right after a trap: its own status is still collectable
  wait "$SRUN_PID"; LAST=$?
  [ "$LAST" -eq 127 ] || RC=$LAST
fi
set -e
log "training step ended with exit code $RC"

# ---------------------------------------------------------------- done, requeue, or fail
mark() {  # mark done|failed "why": a marker the tests and the user can check (Slurm may say COMPLETED anyway)
  printf 'job=%s restarts=%s nodes=%s time=%s %s\n' "$SLURM_JOB_ID" "$RESTARTS" "${NODES[*]}" \
    "$(date -Is)" "$2" > "$SLURM_DIR/$SLURM_JOB_ID.$1"
}
FINISHED_STEP=$(sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p' "$FINISHED" 2>/dev/null | head -n 1 || true)
if [ -n "$FINISHED_STEP" ] && { [ "$MAX_STEPS" -eq 0 ] || [ "$FINISHED_STEP" -ge "$MAX_STEPS" ]; }; then
  mark "done" "step=$FINISHED_STEP"
  log "finished at step $FINISHED_STEP: $SLURM_DIR/$SLURM_JOB_ID.done"
  exit 0
fi
if [ -n "$TERMINATED" ]; then
  log "not finished; ended by Slurm (it requeues preempted jobs itself; resume: sbatch slurm/train.sh again)"
  exit 143
fi
if [ -n "$STOP" ] || [ "$RC" -eq 0 ] || [ "${ILVR_REQUEUE_ON_FAILURE:-0}" = 1 ]; then
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    mark failed "not finished after $RESTARTS requeues (ILVR_MAX_REQUEUES=$MAX_REQUEUES)"
    die "not finished after $RESTARTS requeues (ILVR_MAX_REQUEUES=$MAX_REQUEUES); submit again to resume"
  fi
  log "not finished: requeue $((RESTARTS + 1)) of at most $MAX_REQUEUES; the next part resumes from the latest checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; submit again by hand (--resume auto continues)"
  exit 0
fi
mark failed "exit code $RC"
echo "[train.sh] error: training failed with exit code $RC; see $LOG_DIR/$SLURM_JOB_ID-*.log" >&2
exit "$RC"
