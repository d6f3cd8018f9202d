"""Sweeps: many checkpoints x benchmarks x modes, as MLflow child runs under one parent run.

    plan    -> SWEEP_DIR/sweep.json: the task list, the settings, the parent run id
    task I  -> SWEEP_DIR/tasks/I/{predictions.jsonl, metrics.json}   (one child run)
    summary -> SWEEP_DIR/summary.{md,csv}; ends the parent run

The three steps are separate so a Slurm job array can run the tasks (slurm/eval_sweep.sh)
and a dependent job the summary; `run` does all three in one process. Tasks only read
sweep.json, so any task can be rerun alone after a failure.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict

from ilvr.evaluation.evaluate import METRICS_FILE, DecodeSettings, EvalRequest, run_evaluation, write_json_atomic
from ilvr.evaluation.loading import model_step, resolve_model_path
from ilvr.training.checkpoint import write_text_atomic

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SUMMARY_COLUMNS = ("index", "checkpoint", "step", "benchmark", "mode", "accuracy", "num_samples", "unparseable",
                   "latency_ms_mean", "tokens_per_s", "status")


def _step_key(path: str):
    found = re.search(r"step-(\d+)", os.path.basename(os.path.normpath(path)))
    return (int(found.group(1)) if found else -1, path)


def collect_checkpoints(paths: list[str] | None = None, list_file: str | None = None,
                        pattern: str | None = None) -> list[str]:
    """Checkpoints from explicit paths, a file with one path per line (# comments), or a glob.

    Glob matches that are not evaluable (an unfinished step-N without COMPLETE) are skipped
    with a warning; explicitly named paths must be evaluable. A run dir is resolved to its
    latest checkpoint now, so every task of the sweep evaluates the same weights.
    """
    named = list(paths or [])
    if list_file:
        with open(list_file, encoding="utf-8") as f:
            named += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    found = []
    for path in sorted(glob.glob(pattern), key=_step_key) if pattern else []:
        try:
            resolve_model_path(path)
            found.append(path)
        except FileNotFoundError:
            log.warning("skipping %s: not a complete checkpoint or exported model", path)
    out = list(dict.fromkeys(os.path.abspath(resolve_model_path(p)[1]) for p in named + found))  # raises with the fix
    if not out:
        raise ValueError("the sweep has no checkpoints: give --checkpoints, --checkpoint-list or --checkpoint-glob "
                         "(a glob matched nothing evaluable)")
    return out


def parse_benchmarks(items: list[str]) -> dict[str, str]:
    """["vsp=shards/vsp", ...] -> {"vsp": "shards/vsp"}."""
    out = {}
    for item in items:
        name, sep, shards = item.partition("=")
        if not sep or not name or not shards:
            raise ValueError(f"--benchmark {item!r}: write NAME=SHARDS, e.g. vsp=shards/vsp_test")
        out[name] = shards
    return out


def default_tracking_uri(sweep_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(sweep_dir)}/mlflow.db"


def _tracker(sweep: dict):
    from ilvr.training.tracking import Tracker

    return Tracker(rank=0, world_size=1, output_dir=sweep["dir"], tracking_uri=sweep["tracking_uri"],
                   experiment=sweep["experiment"], attach_env_run=False)


def plan(out_dir: str, checkpoints: list[str], benchmarks: dict[str, str], modes: list[str],
         decode: DecodeSettings, limit: int | None = None, tracking_uri: str | None = None,
         experiment: str | None = None, name: str | None = None) -> dict:
    """Write sweep.json (tasks ordered checkpoint-major) and open the parent MLflow run."""
    for mode in modes:
        DecodeSettings(mode=mode)  # validates
    if os.path.exists(os.path.join(out_dir, SWEEP_FILE)):
        raise FileExistsError(f"{out_dir} already holds a sweep: use a new --out (or delete it); its old task "
                              "results would otherwise mix with the new ones")
    uri = tracking_uri or default_tracking_uri(out_dir)
    if re.search(r"//[^/@]*:[^/@]*@", uri):
        raise ValueError("the tracking URI carries a password, which sweep.json would store: give it through "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")
    os.makedirs(out_dir, exist_ok=True)
    tasks = [{"index": i, "checkpoint": c, "step": model_step(c), "benchmark": b, "shards": s, "mode": m}
             for i, (c, (b, s), m) in enumerate((c, bs, m) for c in checkpoints for bs in benchmarks.items()
                                                for m in modes)]
    sweep = {"name": name or os.path.basename(os.path.abspath(out_dir)), "dir": os.path.abspath(out_dir),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "tracking_uri": uri,
             "experiment": experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ilvr-eval",
             "decode": asdict(decode), "limit": limit, "tasks": tasks, "parent_run_id": None}
    tracker = _tracker(sweep)
    params = {"num_tasks": len(tasks), "checkpoints": len(checkpoints), "benchmarks": ",".join(benchmarks),
              "modes": ",".join(modes), **{f"decode.{k}": v for k, v in asdict(decode).items()}}
    sweep["parent_run_id"] = tracker.start(params, run_name=f"sweep-{sweep['name']}",
                                           tags={"ilvr.kind": "eval-sweep", "ilvr.sweep": sweep["name"]})
    write_json_atomic(os.path.join(out_dir, SWEEP_FILE), sweep)
    log.info("sweep %s: %d tasks (%d checkpoints x %d benchmarks x %d modes), parent run %s", out_dir, len(tasks),
             len(checkpoints), len(benchmarks), len(modes), sweep["parent_run_id"])
    return sweep


def load_sweep(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `ilvr-eval sweep plan --out {sweep_dir} ...` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def task_dir(sweep: dict, index: int) -> str:
    return os.path.join(sweep["dir"], "tasks", str(index))


def run_task(sweep_dir: str, index: int) -> dict:
    """Evaluate task `index` as a child run of the sweep's parent."""
    sweep = load_sweep(sweep_dir)
    if not 0 <= index < len(sweep["tasks"]):
        raise IndexError(f"task {index} does not exist: the sweep has tasks 0..{len(sweep['tasks']) - 1}")
    task = sweep["tasks"][index]
    shutil.rmtree(task_dir(sweep, index), ignore_errors=True)  # a rerun must not leave an old result behind
    req = EvalRequest(model=task["checkpoint"], shards=task["shards"], out_dir=task_dir(sweep, index),
                      benchmark=task["benchmark"], decode=DecodeSettings(**{**sweep["decode"], "mode": task["mode"]}),
                      limit=sweep["limit"], tracking_uri=sweep["tracking_uri"], experiment=sweep["experiment"],
                      parent_run_id=sweep["parent_run_id"],
                      run_name=f"{task['benchmark']}-{task['mode']}-step{task['step'] if task['step'] is not None else 'na'}")
    return run_evaluation(req)


def summary_rows(sweep: dict) -> list[dict]:
    rows = []
    for task in sweep["tasks"]:
        path = os.path.join(task_dir(sweep, task["index"]), METRICS_FILE)
        row = {k: task[k] for k in ("index", "checkpoint", "step", "benchmark", "mode")}
        result = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        if result is not None and result.get("parent_run_id") == sweep["parent_run_id"]:
            m = result["metrics"]
            row.update(accuracy=round(m["accuracy"], 4), num_samples=int(m["num_samples"]),
                       unparseable=int(m["unparseable"]), latency_ms_mean=round(m["latency_ms_mean"], 1),
                       tokens_per_s=round(m["tokens_per_s"], 1), status="ok")
        else:
            row.update({k: "" for k in SUMMARY_COLUMNS if k not in row}, status="missing")
        rows.append(row)
    return rows


def write_summary(sweep_dir: str) -> tuple[list[dict], list[int]]:
    """summary.md + summary.csv; returns (rows, indices of tasks without results). Ends the parent run."""
    sweep = load_sweep(sweep_dir)
    rows = summary_rows(sweep)
    missing = [r["index"] for r in rows if r["status"] != "ok"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(sweep_dir, "summary.csv"), table.getvalue())
    lines = [f"# Sweep {sweep['name']}", "", f"{len(rows)} tasks, {len(rows) - len(missing)} with results; "
             f"MLflow parent run `{sweep['parent_run_id']}`.", "",
             "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    write_text_atomic(os.path.join(sweep_dir, "summary.md"), "\n".join(lines) + "\n")
    if sweep.get("parent_run_id"):
        tracker = _tracker(sweep)
        tracker.attach(sweep["parent_run_id"])
        tracker.log_artifact(os.path.join(sweep_dir, "summary.md"))
        tracker.log_artifact(os.path.join(sweep_dir, "summary.csv"))
        tracker.end("FAILED" if missing else "FINISHED")
    return rows, missing
