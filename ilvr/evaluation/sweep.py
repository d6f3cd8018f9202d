"""Sweeps: many checkpoints x benchmarks x modes, as MLflow child runs under one parent run.

    plan    -> SWEEP_DIR/sweep.json: one task per checkpoint, the settings, the parent run id
    task I  -> SWEEP_DIR/tasks/I/<benchmark>-<mode>/{predictions.jsonl, metrics.json}   (a child run each)
    summary -> SWEEP_DIR/summary.{md,csv}; ends the parent run

A task is one checkpoint with all its (benchmark, mode) evaluations: the weights are loaded (a ZeRO
checkpoint consolidated, ~28 GB of work for 7B) once per checkpoint, not once per evaluation.
The three steps are separate so a Slurm job array can run the tasks (slurm/eval_sweep.sh)
and a dependent job the summary; `run` does all three in one process. Tasks only read
sweep.json, so any task can be rerun alone after a failure.

The MLflow store is the one the checkpoints' training run logged to (the UI then shows training and its
evaluations together), unless --tracking-uri / MLFLOW_TRACKING_URI say otherwise (evaluate.eval_store).
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

from ilvr.evaluation.data import load_records
from ilvr.evaluation.evaluate import (METRICS_FILE, DecodeSettings, EvalRequest, check_references, eval_store,
                                      run_evaluation, training_origin, write_json_atomic)
from ilvr.evaluation.loading import load_eval_model, model_step, resolve_model_path
from ilvr.fileio import write_text_atomic

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


def training_store(origins: dict) -> "str | None":
    """The one store the checkpoints' training runs logged to (None: none recorded); several: an error."""
    stores = sorted({o.tracking_uri for o in origins.values() if o.tracking_uri})
    if len(stores) > 1:
        from ilvr.training.mlflow_store import redact_uri

        raise ValueError(f"the checkpoints come from training runs in {len(stores)} MLflow stores "
                         f"({', '.join(redact_uri(u) for u in stores)}): pass --tracking-uri to choose one")
    return stores[0] if stores else None


def _tracker(sweep: dict):
    from ilvr.training.tracking import Tracker

    return Tracker(rank=0, world_size=1, output_dir=sweep["dir"], tracking_uri=sweep["tracking_uri"],
                   experiment=sweep["experiment"], attach_env_run=False)


def plan(out_dir: str, checkpoints: list[str], benchmarks: dict[str, str], modes: list[str],
         decode: DecodeSettings, limit: int | None = None, tracking_uri: str | None = None,
         experiment: str | None = None, name: str | None = None) -> dict:
    """Write sweep.json (one task per checkpoint, its evaluations benchmark-major) and open the parent run."""
    for mode in modes:
        DecodeSettings(mode=mode)  # validates
    if os.path.exists(os.path.join(out_dir, SWEEP_FILE)):
        raise FileExistsError(f"{out_dir} already holds a sweep: use a new --out (or delete it); its old task "
                              "results would otherwise mix with the new ones")
    origins = {c: training_origin(c) for c in checkpoints}
    run_ids = sorted({o.run_id for o in origins.values() if o.run_id})
    origin = next((o for o in origins.values() if o.tracking_uri), next(iter(origins.values())))
    uri, experiment = eval_store(tracking_uri or training_store(origins), experiment, origin)
    uri = uri or default_tracking_uri(out_dir)
    if re.search(r"//[^/@]*:[^/@]*@", uri):
        raise ValueError("the tracking URI carries a password, which sweep.json would store: give it through "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")
    os.makedirs(out_dir, exist_ok=True)
    tasks = [{"index": i, "checkpoint": c, "step": model_step(c), "train_run_id": origins[c].run_id,
              "evals": [{"benchmark": b, "shards": s, "mode": m, "dir": f"tasks/{i}/{b}-{m}"}
                        for b, s in benchmarks.items() for m in modes]}
             for i, c in enumerate(checkpoints)]
    sweep = {"name": name or os.path.basename(os.path.abspath(out_dir)), "dir": os.path.abspath(out_dir),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "tracking_uri": uri, "experiment": experiment,
             "decode": asdict(decode), "limit": limit, "tasks": tasks, "parent_run_id": None}
    tracker = _tracker(sweep)
    params = {"num_tasks": len(tasks), "checkpoints": len(checkpoints), "benchmarks": ",".join(benchmarks),
              "modes": ",".join(modes), **{f"decode.{k}": v for k, v in asdict(decode).items()}}
    tags = {"ilvr.kind": "sweep", "ilvr.sweep": sweep["name"]}
    if len(run_ids) == 1:
        tags["ilvr.train_run_id"] = run_ids[0]
    sweep["parent_run_id"] = tracker.start(params, run_name=f"sweep-{sweep['name']}", tags=tags)
    write_json_atomic(os.path.join(out_dir, SWEEP_FILE), sweep)
    log.info("sweep %s: %d tasks (checkpoints) x %d evaluations (%d benchmarks x %d modes), parent run %s",
             out_dir, len(tasks), len(benchmarks) * len(modes), len(benchmarks), len(modes), sweep["parent_run_id"])
    return sweep


def load_sweep(sweep_dir: str) -> dict:
    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `ilvr-eval sweep plan --out {sweep_dir} ...` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def task_dir(sweep: dict, index: int) -> str:
    return os.path.join(sweep["dir"], "tasks", str(index))


def task_evals(task: dict) -> list[dict]:
    """A task's evaluations; a sweep.json planned before tasks were per checkpoint has one, in tasks/<index>."""
    if "evals" in task:
        return task["evals"]
    return [{"benchmark": task["benchmark"], "shards": task["shards"], "mode": task["mode"],
             "dir": f"tasks/{task['index']}"}]


def run_task(sweep_dir: str, index: int) -> list[dict]:
    """Evaluate checkpoint `index` on every (benchmark, mode) of the sweep, each a child run of its parent.

    The inputs (shards, references) are checked first, then the model is loaded once for all evaluations.
    One failing evaluation does not stop the others; the task then fails naming them."""
    sweep = load_sweep(sweep_dir)
    if not 0 <= index < len(sweep["tasks"]):
        raise IndexError(f"task {index} does not exist: the sweep has tasks 0..{len(sweep['tasks']) - 1}")
    task = sweep["tasks"][index]
    evals = task_evals(task)
    shutil.rmtree(task_dir(sweep, index), ignore_errors=True)  # a rerun must not leave an old result behind
    data = {}
    for ev in evals:  # before the model loads (minutes for 7B): a typo in the shards must fail in seconds
        if ev["shards"] not in data:
            data[ev["shards"]] = load_records(ev["shards"], sweep["limit"])
        check_references(data[ev["shards"]].records, ev["benchmark"])
    log.info("task %d: %s, %d evaluations on one load of the weights", index, task["checkpoint"], len(evals))
    em = load_eval_model(task["checkpoint"])
    step = "na" if task["step"] is None else task["step"]
    results, failed = [], []
    for ev in evals:
        req = EvalRequest(model=task["checkpoint"], shards=ev["shards"], out_dir=os.path.join(sweep["dir"], ev["dir"]),
                          benchmark=ev["benchmark"], decode=DecodeSettings(**{**sweep["decode"], "mode": ev["mode"]}),
                          limit=sweep["limit"], tracking_uri=sweep["tracking_uri"], experiment=sweep["experiment"],
                          parent_run_id=sweep["parent_run_id"], run_name=f"{ev['benchmark']}-{ev['mode']}-step{step}")
        try:
            results.append(run_evaluation(req, em=em, data=data[ev["shards"]]))
        except Exception:  # one bad evaluation must not cost the others; the task fails at the end
            log.exception("sweep task %d: %s / %s failed", index, ev["benchmark"], ev["mode"])
            failed.append(f"{ev['benchmark']}/{ev['mode']}")
    if failed:
        raise RuntimeError(f"task {index} ({task['checkpoint']}): {len(failed)} of {len(evals)} evaluations failed "
                           f"({', '.join(failed)}; see the log); rerun with `ilvr-eval sweep task --sweep "
                           f"{sweep['dir']} --index {index}`")
    return results


def summary_rows(sweep: dict) -> list[dict]:
    """One row per (checkpoint task, benchmark, mode); `index` is the task (checkpoint) to rerun."""
    rows = []
    for task in sweep["tasks"]:
        for ev in task_evals(task):
            path = os.path.join(sweep["dir"], ev["dir"], METRICS_FILE)
            row = {"index": task["index"], "checkpoint": task["checkpoint"], "step": task["step"],
                   "benchmark": ev["benchmark"], "mode": ev["mode"]}
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
    """summary.md + summary.csv; returns (rows, indices of tasks with a result missing). Ends the parent run."""
    sweep = load_sweep(sweep_dir)
    rows = summary_rows(sweep)
    missing = sorted({r["index"] for r in rows if r["status"] != "ok"})
    ok = sum(r["status"] == "ok" for r in rows)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(sweep_dir, "summary.csv"), table.getvalue())
    lines = [f"# Sweep summary: {sweep['name']}", "", f"{len(sweep['tasks'])} tasks (checkpoints), {len(rows)} evaluations, "
             f"{ok} with results; MLflow parent run `{sweep['parent_run_id']}`.", "",
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
