"""A run dir's own record of its tracking: metrics.jsonl (every logged step, written by the trainer),
mlflow_run.json (the run id, the recorded status, what did not reach MLflow), and delivering later what
did not arrive (`python -m ilvr.training.tracking RUN_DIR --backfill`)."""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from ilvr.fileio import write_text_atomic
from ilvr.training.mlflow_store import (MAX_METRICS_PER_BATCH, MAX_PARAM_VALUE, MAX_PARAMS_PER_BATCH, clean_values,
                                        connectable_uri, local_artifact_location, metric_values, prepare_server,
                                        scalar_metrics, store_record)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # written by the trainer on rank 0: {"step": N, ...metrics} per logged step
STATE_FILE = "mlflow_run.json"  # run id, recorded status, whether it and all steps reached MLflow


def _parse_line(line: str) -> "dict | None":
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
    return row if ok else None


def truncate_metrics(path: str, step: int) -> int:
    """On resume: keep the lines with step <= `step` (steps past the checkpoint are trained again and
    would appear twice) and drop torn or foreign lines; atomic. Returns the number of lines dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep = [line for line in lines if (row := _parse_line(line)) is not None and row["step"] <= step]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))
        logger.info("%s: dropped %d lines past step %d (or unreadable)", path, len(lines) - len(keep), step)
    return len(lines) - len(keep)


def read_metrics(path: str, lo: int = 0, hi: "int | None" = None) -> dict[int, list[tuple[str, float]]]:
    """Step -> numbers of the lines with lo <= step <= hi (the last line of a step wins); bad lines skipped."""
    out: dict[int, list[tuple[str, float]]] = {}
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            row = _parse_line(line)
            if row is not None and lo <= row["step"] and (hi is None or row["step"] <= hi):
                step = row.pop("step")
                out[step] = metric_values(scalar_metrics(row))
    return out


def last_step(path: str) -> "int | None":
    """The step of the last complete line (read from the file's tail)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65536))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        row = _parse_line(line)
        if row is not None:
            return row["step"]
    return None


def backfill_metrics(client, run_id: str, path: str, lo: int = 0, hi: "int | None" = None) -> int:
    """Log the steps of metrics.jsonl in [lo, hi] that the run lacks; returns how many steps were sent.

    A step counts as present when its first key (sorted) has a point at that step: our batches hold
    whole steps, so one history query per distinct first key is enough (usually one)."""
    from mlflow.entities import Metric

    rows = {s: sorted(v) for s, v in read_metrics(path, lo, hi).items() if v}
    probes = {v[0][0] for v in rows.values()}
    have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in probes}
    missing = [(s, v) for s, v in sorted(rows.items()) if s not in have[v[0][0]]]
    now = int(time.time() * 1000)
    batch: list = []
    for step, values in missing:
        if batch and len(batch) + len(values) > MAX_METRICS_PER_BATCH:
            client.log_batch(run_id, metrics=batch)
            batch = []
        batch += [Metric(k, v, now, step) for k, v in values[:MAX_METRICS_PER_BATCH]]
    if batch:
        client.log_batch(run_id, metrics=batch)
    return len(missing)


def read_state(output_dir: str, unstarted: bool = False) -> "dict | None":
    """mlflow_run.json of a run dir; None without one. `unstarted`: also the record of a run whose start could
    not reach the store (run_id null, "start_failed"), which only --backfill and a resume act on."""
    try:
        with open(os.path.join(output_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    return state if state.get("run_id") or (unstarted and state.get("start_failed")) else None


def run_store(run_dir: str) -> "tuple[str | None, str] | None":
    """(URI to connect with or None, run id) of the MLflow run a training run dir logged to (mlflow_run.json);
    None when the dir has no record."""
    state = read_state(run_dir)
    if state is None:
        return None
    return connectable_uri(state.get("tracking_uri"), state.get("tracking_db"), run_dir), state["run_id"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def backfill_run(run_dir: str, tracking_uri: "str | None" = None, status: "str | None" = None) -> str:
    """Deliver what a run's processes could not: the steps of metrics.jsonl missing in MLflow and the
    recorded final status (KILLED for a RUNNING run whose process is gone from this host)."""
    from mlflow import MlflowClient

    state = read_state(run_dir, unstarted=True)
    if state is None:
        raise FileNotFoundError(f"no {STATE_FILE} in {run_dir}: not a run directory written by this tracker")
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or connectable_uri(state["tracking_uri"], state.get("tracking_db"), run_dir) or state["tracking_uri"])
    if "//***@" in uri:
        raise ValueError("the recorded tracking URI had credentials (not stored): pass --tracking-uri or set "
                         "MLFLOW_TRACKING_URI, with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    here = state.get("host") == socket.gethostname()
    if state.get("status") == "RUNNING" and here and _pid_alive(int(state.get("pid") or 0)) and not status:
        raise RuntimeError(f"run {state['run_id']} is still being logged by process {state.get('pid')}")
    prepare_server(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = state["run_id"]
    if not run_id:  # the training's start never reached the store
        run_id = create_backfill_run(client, uri, run_dir, state)
        state.update(run_id=run_id, created_by="backfill")
    sent = backfill_metrics(client, run_id, os.path.join(run_dir, METRICS_FILE))
    final = status or state.get("status")
    if final == "RUNNING":
        final = "KILLED" if here else None  # its process is gone (checked above)
    note = ""
    if final:
        client.set_terminated(run_id, status=final.upper())
    else:
        note = f" (left RUNNING: its process ran on {state.get('host')}; pass --status KILLED once it is gone)"
    state.pop("start_failed", None)
    state.update(store_record(uri, run_id, run_dir))
    state.update(status=(final or "RUNNING").upper(), status_delivered=bool(final), undelivered_steps=0,
                 undelivered_from=None, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_text_atomic(os.path.join(run_dir, STATE_FILE), json.dumps(state, indent=1) + "\n")
    return f"MLflow run {run_id}: backfilled {sent} steps from {METRICS_FILE}; status {final or 'RUNNING'}{note}"


def create_backfill_run(client, uri: str, run_dir: str, state: dict) -> str:
    """The MLflow run a training run never got (its start could not reach the store): created now in the
    recorded experiment, named after the run dir, with the params of config.resolved.yaml, and recorded in
    mlflow_run.json at once (`created_by: backfill`) so a retry or a resume uses it, never a second one."""
    from mlflow.exceptions import MlflowException

    name = state.get("experiment") or "ilvr"
    exp = client.get_experiment_by_name(name)
    try:
        exp_id = exp.experiment_id if exp else client.create_experiment(name,
                                                                        artifact_location=local_artifact_location(uri))
    except MlflowException:  # created meanwhile
        exp_id = client.get_experiment_by_name(name).experiment_id
    tags = {"hostname": state.get("host") or "", "backfilled": "true", "start_failed": state.get("start_failed")}
    run_id = client.create_run(exp_id, run_name=os.path.basename(os.path.abspath(run_dir)),
                               tags=clean_values(tags, MAX_PARAM_VALUE)).info.run_id
    write_text_atomic(os.path.join(run_dir, STATE_FILE),
                  json.dumps({**state, **store_record(uri, run_id, run_dir), "created_by": "backfill"}, indent=1) + "\n")
    config = os.path.join(run_dir, "config.resolved.yaml")  # ilvr.training.run_dir.RESOLVED_FILE
    if os.path.isfile(config):
        from mlflow.entities import Param

        from ilvr.config import load_config

        params = [Param(k, v) for k, v in clean_values(load_config(config, [], check_paths=False).flat(),
                                                  MAX_PARAM_VALUE).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
    logger.info("MLflow: created run %s for %s (its start never reached the store)", run_id, run_dir)
    return run_id
