"""MLflow tracking for training runs: rank 0 only, and never able to stop, stall or silently lose.

    tracker = Tracker()                       # a no-op on ranks != 0
    run_id = tracker.start(cfg, "stage1-7b", resume_run_id=ckpt_meta.get("mlflow_run_id"))
    tracker.log_metrics({"loss": 1.2}, step=10)   # queued: returns in microseconds
    tracker.end("FINISHED")                   # waits (bounded) for the queue, then sets the status

Store: MLFLOW_TRACKING_URI if set, else a SQLite DB in the output dir (no server needed). Like
HF's MLflowCallback it honours MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID and MLFLOW_TAGS. A resumed
run logs into the same MLflow run.

start() talks to the store directly (it must return the run id). Every later call goes into a
bounded queue (send_queue.py) that one background thread sends: a dead or frozen server costs the training
ranks nothing. Failed sends stay queued and are retried with exponential backoff; past
`max_pending` calls the oldest metric steps are dropped from memory and, when the server
answers again, backfilled from `<output_dir>/metrics.jsonl` (the trainer's per-step log).
end() waits at most `end_timeout_s`; whatever did not arrive (steps, the final status) is
recorded in `<output_dir>/mlflow_run.json`, which a resume of the run or
`python -m ilvr.training.tracking RUN_DIR --backfill` delivers later. A start that cannot reach the
store is recorded there too (run_id null): --backfill (or a resume) then creates the run and sends it all.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Mapping

from ilvr.fileio import write_text_atomic
from ilvr.training.mlflow_store import (MAX_KEY, MAX_METRICS_PER_BATCH, MAX_PARAM_VALUE, MAX_PARAMS_PER_BATCH,
                                        clean_values, local_artifact_location, metric_values, prepare_server,
                                        redact_uri, relocate_artifacts, run_tags, store_record, unique_run_name)
from ilvr.training.run_record import (METRICS_FILE, STATE_FILE, backfill_metrics, backfill_run, last_step,
                                      read_metrics, read_state)
from ilvr.training.send_queue import Call, SendQueue

logger = logging.getLogger(__name__)

END_TIMEOUT_S = 30.0  # default; ILVR_MLFLOW_END_TIMEOUT_S overrides
MAX_PENDING = 4096  # queued calls kept in memory (a metric step is ~1-2 KB)


def _env_int(name: str) -> "int | None":
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


class Tracker:
    """An MLflow run on rank 0; on other ranks (or with enabled=False) every method does nothing."""

    def __init__(self, rank: "int | None" = None, world_size: "int | None" = None, output_dir: "str | None" = None,
                 enabled: bool = True, retry_after_s: float = 60.0, tracking_uri: "str | None" = None,  # max backoff
                 experiment: "str | None" = None, attach_env_run: bool = True,
                 end_timeout_s: "float | None" = None, max_pending: int = MAX_PENDING,
                 end_on_exit: "str | None" = None):
        if rank is None:
            rank = _env_int("RANK") if _env_int("RANK") is not None else (_env_int("SLURM_PROCID") or 0)
        self.rank = rank
        self.world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
        self.output_dir = output_dir  # default: config.train.output_dir
        self.active = enabled and self.rank == 0
        self.client = None
        self.run_id: "str | None" = None
        self.tracking_uri = tracking_uri  # default: MLFLOW_TRACKING_URI, else sqlite in output_dir
        self.experiment = experiment  # default: MLFLOW_EXPERIMENT_NAME, else "ilvr"
        self.attach_env_run = attach_env_run  # False for runs that must not log into MLFLOW_RUN_ID (evaluation)
        self.end_timeout_s = end_timeout_s if end_timeout_s is not None else \
            _env_float("ILVR_MLFLOW_END_TIMEOUT_S", END_TIMEOUT_S)
        self.end_on_exit = end_on_exit  # status set if the process exits without end() (None: leave the run open)
        self.backfilled = 0  # steps sent from metrics.jsonl
        # every call after start() goes through this queue; its sender thread runs from _launch()
        self._calls = SendQueue(self._send, self._backfill, self._warn, max_pending, retry_after_s)
        self._warned: set[str] = set()
        self._end_delivered = False
        self._start_error: "str | None" = None  # start() could not reach the store: the run is created by --backfill

    # ------------------------------------------------------------------ warnings
    def _warn(self, what: str, err: BaseException, tail: str) -> None:
        msg = redact_uri(f"{type(err).__name__}: {err}")[:500]
        # logged from inside a handler whose context is the redacted message alone: should logging itself
        # fail (a closed stream), its error report prints the context, and MLflow's exception text holds
        # the URL with its credentials
        try:
            raise RuntimeError(msg) from None
        except RuntimeError:
            logger.warning("MLflow tracking failed (%s): %s. %s", what, msg, tail)

    @property
    def lost(self) -> int:
        """Calls given up: a permanent error, or dropped with nothing to backfill them from."""
        return self._calls.lost

    @property
    def overflowed(self) -> int:
        """Metric steps dropped from the full queue (backfilled from metrics.jsonl)."""
        return self._calls.overflowed

    def _fail_start(self, what: str, err: BaseException) -> None:
        self._calls.lost += 1
        if what not in self._warned:
            self._warned.add(what)
            self._warn(what, err, "Training goes on without tracking.")

    @property
    def dropped(self) -> int:
        """Calls that did not reach MLflow. Waits (at most end_timeout_s) for queued calls to be tried,
        so a caller can choose the end status from it."""
        if self._calls.running:
            self.flush(self.end_timeout_s)
        return self.lost + self._calls.pending()

    def _ready(self) -> bool:
        return bool(self.active and self.run_id)

    # ------------------------------------------------------------------ start / attach / end
    def start(self, config, run_name: "str | None" = None, resume_run_id: "str | None" = None,
              tags: "Mapping[str, Any] | None" = None, world_size: "int | None" = None,
              start_time: "float | None" = None) -> "str | None":
        """Create (or reattach to) the run and log the flattened config; returns the run id or None.
        A new run's name is made unique in its experiment (unique_run_name); `start_time` (time.time()):
        when the work began, if before this call (an evaluation's decoding), so the run's duration covers it."""
        if not self.active:
            return None
        self.world_size = world_size or self.world_size
        self.start_time = start_time
        try:
            self._start(config, run_name, resume_run_id, dict(tags or {}))
        except Exception as e:  # any store error: train without tracking
            self._fail_start("start", e)
            self.run_id = None
            self.active = False
            self._record_unstarted(e)
            return None
        self.log_params(config)
        self._launch()
        return self.run_id

    def _start(self, config, run_name, resume_run_id, tags) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.output_dir = output_dir = os.path.abspath(self.output_dir or config.train.output_dir)
        uri = self.tracking_uri = (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                   or f"sqlite:///{output_dir}/mlflow.db")
        artifact_location = local_artifact_location(uri)
        relocate_artifacts(uri)  # a moved store: new runs must write beside the db, not at the old place
        prepare_server(uri)
        self.client = client = MlflowClient(tracking_uri=uri)

        tags = {**run_tags(self.world_size), **tags}
        env_run = os.environ.get("MLFLOW_RUN_ID") if self.attach_env_run else None
        if env_run and resume_run_id and env_run != resume_run_id:
            logger.warning("MLFLOW_RUN_ID=%s differs from the checkpoint's run %s; logging into MLFLOW_RUN_ID",
                           env_run, resume_run_id)
        run_id = env_run or resume_run_id or self._backfilled_run()
        if run_id:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")  # also a run left RUNNING by a process that died
                self.run_id = run_id
                self.set_tags({**tags, "resumed": "true"})
                self._resume_backfill()
                logger.info("MLflow: resumed run %s at %s", run_id, redact_uri(uri))
                return
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("MLflow run %s not found in %s; starting a new run", run_id, redact_uri(uri))
                tags["resumed_from_run_id"] = run_id
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ilvr"
        exp = client.get_experiment_by_name(name)
        try:
            exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a concurrent run
            exp_id = client.get_experiment_by_name(name).experiment_id
        run_name = unique_run_name(client, exp_id, run_name)
        start_ms = int(self.start_time * 1000) if getattr(self, "start_time", None) else None
        self.run_id = client.create_run(exp_id, start_time=start_ms, run_name=run_name,
                                        tags=clean_values(tags, MAX_PARAM_VALUE)).info.run_id
        logger.info("MLflow: run %s in experiment %r at %s", self.run_id, name, redact_uri(uri))
        self._earlier_steps()

    # ------------------------------------------------------------------ a start without the store
    def _record_unstarted(self, err: BaseException) -> None:
        """start() failed (server unreachable): say so in mlflow_run.json, with no run id, so that
        `--backfill` (or a resume) can create the run and send everything later; the final status is
        recorded at end(), or at exit for a process that never calls it."""
        if not self.output_dir:
            return
        self._start_error = redact_uri(f"{type(err).__name__}: {err}")[:300]
        self._save_state("RUNNING", False, 0)
        if self.end_on_exit:
            atexit.register(self._at_exit)

    def _end_unstarted(self, status: str) -> None:
        atexit.unregister(self._at_exit)
        steps = len(read_metrics(os.path.join(self.output_dir, METRICS_FILE)))
        self._save_state(status, False, steps, 0 if steps else None)
        logger.warning("MLflow: no run was created (the store was unreachable at start: %s). %d logged steps and the "
                       "status %s are kept in %s and %s; when the store answers, run `python -m "
                       "ilvr.training.tracking %s --backfill` (creates the run and sends them; resuming the run "
                       "does it too)", self._start_error, steps, status, METRICS_FILE, STATE_FILE, self.output_dir)

    def _backfilled_run(self) -> "str | None":
        """The run `--backfill` created for this output dir after a start without the store: a resume whose
        checkpoint has no run id logs into it instead of starting a second run."""
        state = read_state(self.output_dir) or {}
        return state["run_id"] if state.get("created_by") == "backfill" else None

    def _earlier_steps(self) -> None:
        """A new run in a dir whose earlier process never reached the store: its steps (metrics.jsonl, truncated
        to the resumed step) are sent once the sender runs."""
        state = read_state(self.output_dir, unstarted=True)
        if not state or state.get("run_id") is not None:
            return
        path = os.path.join(self.output_dir, METRICS_FILE)
        hi = last_step(path)
        if hi is not None:
            self._calls.set_gap(0, hi, len(read_metrics(path, 0, hi)))
            logger.info("MLflow: the earlier process of this run never reached the store; sending its steps "
                        "0..%d from %s", hi, path)

    def _resume_backfill(self) -> None:
        """The previous process of this run died or ended with steps undelivered: backfill them (up to
        the resumed step, the last line of metrics.jsonl now) once the sender runs."""
        state = read_state(self.output_dir)
        if not state or state.get("run_id") != self.run_id:
            return
        if state.get("status") != "RUNNING" and state.get("status_delivered") and not state.get("undelivered_steps"):
            return
        path = os.path.join(self.output_dir, METRICS_FILE)
        try:
            hi, lo = last_step(path), int(state.get("undelivered_from") or 0)
            if hi is not None:
                self._calls.set_gap(lo, hi, len(read_metrics(path, lo, hi)))
        except (OSError, ValueError, TypeError) as e:
            logger.warning("MLflow: cannot read %s to backfill the previous process's steps: %s", path, e)

    def attach(self, run_id: str) -> None:
        """Log into an existing run (a sweep's parent) as it is: no new run, no status or tag change."""
        if not self.active:
            return
        try:
            from mlflow import MlflowClient

            uri = self.tracking_uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            prepare_server(uri)
            self.client = MlflowClient(tracking_uri=uri)
            self.client.get_run(run_id)
            self.run_id = run_id
        except Exception as e:
            self._fail_start("attach", e)
            return
        self._launch(write_state=False)

    def _launch(self, write_state: bool = True) -> None:
        """The sender thread; the state file says RUNNING (a process that dies leaves it so)."""
        if write_state:
            self._save_state("RUNNING", True, 0)
        self._calls.start()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """The process exits without end(): deliver what is queued (bounded), and set end_on_exit if given."""
        if self.end_on_exit and self._start_error is not None:
            self._end_unstarted(self.end_on_exit)
        elif self.end_on_exit and self._ready():
            logger.warning("MLflow: the process exits without ending run %s; marking it %s",
                           self.run_id, self.end_on_exit)
            self.end(self.end_on_exit)
        elif self._ready():
            self.flush(self.end_timeout_s)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED after the queued calls, waiting at most end_timeout_s;
        what did not arrive is recorded in mlflow_run.json for a resume or a --backfill."""
        if self._start_error is not None:
            self._end_unstarted(status.upper())
            return
        if not self._ready():
            return
        status = status.upper()
        atexit.unregister(self._at_exit)
        self._save_state(status, False, self._calls.pending_steps())  # first: a SIGKILL while waiting leaves it
        self._calls.submit(Call("end", lambda: self.client.set_terminated(self.run_id, status=status)))
        self._calls.hurry()
        t0 = time.monotonic()
        done = self.flush(self.end_timeout_s)
        missing, first = self._calls.stop()
        self._save_state(status, self._end_delivered, missing, first)
        if self.lost:
            logger.warning("MLflow: %d tracking calls could not be delivered (see the warnings above)", self.lost)
        if not done:
            where = self.output_dir or "the output dir"
            logger.warning("MLflow: after %.0f s, %d logged steps%s and the final status %s have not reached %s. "
                           "They are kept in %s; when the server answers, run `python -m ilvr.training.tracking %s "
                           "--backfill` (resuming the run does it too).", time.monotonic() - t0, missing,
                           f" (from step {first})" if first is not None else "", status,
                           redact_uri(self.tracking_uri or ""), os.path.join(where, STATE_FILE), where)
        self.active = False

    def _save_state(self, status: str, delivered: bool, undelivered: int, first: "int | None" = None) -> None:
        if not (self.output_dir and (self.run_id or self._start_error)):
            return
        record = store_record(self.tracking_uri, self.run_id, self.output_dir) if self.run_id else {
            "run_id": None, "tracking_uri": redact_uri(self.tracking_uri or ""), "start_failed": self._start_error,
            "experiment": self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ilvr"}
        state = {**record, "status": status,
                 "status_delivered": delivered, "undelivered_steps": undelivered, "undelivered_from": first,
                 "pid": os.getpid(), "host": socket.gethostname(),
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            write_text_atomic(os.path.join(self.output_dir, STATE_FILE), json.dumps(state, indent=1) + "\n")
        except OSError as e:
            logger.warning("MLflow: could not write %s: %s", os.path.join(self.output_dir, STATE_FILE), e)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued call was delivered or given up (at most `timeout` s); True if so."""
        return self._calls.flush(timeout)

    # ------------------------------------------------------------------ what the queue's sender calls
    def _send(self, batch: list[Call]) -> None:
        if batch[0].kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, c.stamp, c.step) for c in batch for k, v in c.data]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        else:
            batch[0].data()
            if batch[0].kind == "end":
                self._end_delivered = True

    def _backfill(self, gap: list) -> None:
        path = os.path.join(self.output_dir or "", METRICS_FILE)
        if not (self.output_dir and os.path.isfile(path)):
            self._calls.lost += gap[2]
            logger.warning("MLflow: %d metric steps were dropped while the server was down and there is no %s "
                           "to backfill them from", gap[2], path)
            return
        sent = backfill_metrics(self.client, self.run_id, path, gap[0], gap[1])
        self.backfilled += sent
        logger.info("MLflow: backfilled %d steps (%d..%d) from %s", sent, gap[0], gap[1], path)

    # ------------------------------------------------------------------ logging calls (queued)
    def log_params(self, params) -> None:
        """Log a Config (flattened) or a dict; on a resumed run, changed values become tags, not errors."""
        if not self._ready():
            return
        items = clean_values(params.flat() if hasattr(params, "flat") else dict(params), MAX_PARAM_VALUE)
        self._calls.submit(Call("log_params", lambda: self._log_params(items)))

    def _log_params(self, items: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in items.items() if k not in existing]
        changed = [RunTag(f"resume_changed.{k}"[:MAX_KEY], v) for k, v in items.items()
                   if k in existing and existing[k] != v]
        if changed:
            logger.info("MLflow: %d params changed since the run started; logged as resume_changed.* tags",
                        len(changed))
        for items_, kw in ((new, "params"), (changed, "tags")):
            for i in range(0, len(items_), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, **{kw: items_[i:i + MAX_PARAMS_PER_BATCH]})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers (and 1-element tensors) only; other values are skipped. Queued: never waits on the store."""
        if not self._ready():
            return
        values = metric_values(metrics)
        if values:
            self._calls.submit(Call("metrics", values, int(step)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._ready():
            return
        from mlflow.entities import RunTag

        cleaned = [RunTag(k, v) for k, v in clean_values(tags, MAX_PARAM_VALUE).items()]
        self._calls.submit(Call("set_tags", lambda: self._log_tags(cleaned)))

    def _log_tags(self, tags: list) -> None:
        for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tags[i:i + MAX_PARAMS_PER_BATCH])

    def log_artifact(self, path: str, artifact_path: "str | None" = None) -> None:
        """Copy a file or a directory into the run's artifacts."""
        if not self._ready():
            return
        if not os.path.exists(path):
            logger.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        upload: Callable = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
        self._calls.submit(Call("log_artifact", lambda: upload(self.run_id, path, artifact_path)))

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A column -> values table the MLflow UI shows under the run's artifacts (e.g. per-category scores)."""
        if not self._ready():
            return
        table = {k: list(v) for k, v in data.items()}
        self._calls.submit(Call("log_table", lambda: self.client.log_table(self.run_id, data=table,
                                                                      artifact_file=artifact_file)))


def summarize(output_dir: str) -> str:
    """A few lines about the runs in a run directory's default store (used by the quick start)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(output_dir)}/mlflow.db")
    lines = []
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        loss = client.get_metric_history(run.info.run_id, "loss")
        arts = [a.path for a in client.list_artifacts(run.info.run_id)]
        first, last = (loss[0].value, loss[-1].value) if loss else (float("nan"), float("nan"))
        lines.append(f"MLflow run {run.info.run_id} ({run.info.status}): {len(run.data.params)} params, "
                     f"{len(loss)} loss points ({first:.3f} -> {last:.3f}), artifacts {arts}")
    return "\n".join(lines) or f"no MLflow runs under {output_dir}"


def main(argv: "list[str] | None" = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ilvr.training.tracking",
                                description="Summarize a run dir's MLflow runs, or backfill what did not arrive.")
    p.add_argument("run_dir")
    p.add_argument("--backfill", action="store_true",
                   help="send the steps of metrics.jsonl missing in the run and its recorded final status")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the recorded one")
    p.add_argument("--status", choices=["FINISHED", "FAILED", "KILLED"], default=None,
                   help="final status to set (default: the recorded one)")
    p.add_argument("--relocate", action="store_true",
                   help="after moving or copying the run dir: point its SQLite store's artifact locations at "
                        "<run dir>/mlartifacts, so `mlflow ui` opens the artifacts (ilvr's own tools need not)")
    args = p.parse_args(argv)
    if args.relocate:
        uri = args.tracking_uri or f"sqlite:///{os.path.abspath(args.run_dir)}/mlflow.db"
        print(f"{relocate_artifacts(uri)} experiment(s) of {redact_uri(uri)} relocated")
        return 0
    if not args.backfill:
        print(summarize(args.run_dir))
        return 0
    try:
        print(backfill_run(args.run_dir, args.tracking_uri, args.status))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"backfill: {redact_uri(str(e))}")
        return 2
    except Exception as e:  # the store: still down, refused, ...
        print(f"backfill failed, nothing lost (retry later): {redact_uri(f'{type(e).__name__}: {e}')[:500]}")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
