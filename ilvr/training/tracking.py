"""MLflow tracking for training runs: rank 0 only, and never able to stop training.

    tracker = Tracker()                       # a no-op on ranks != 0
    run_id = tracker.start(cfg, "stage1-7b", resume_run_id=ckpt_meta.get("mlflow_run_id"))
    tracker.log_metrics({"loss": 1.2}, step=10)
    tracker.end("FINISHED")

Store: MLFLOW_TRACKING_URI if set, else a SQLite DB in the output dir (no server needed). Like
HF's MLflowCallback it honours MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID and MLFLOW_TAGS. A resumed
run logs into the same MLflow run. When the store fails, one warning is logged, calls become
no-ops, and a retry is tried now and then: a tracking outage must not cost a training job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for params/tags in one log_batch
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
_SECRET = re.compile(r"pass(word|wd)|secret|api[_-]?key|access[_-]?key|credential|authorization"
                     r"|(^|[^a-z])token($|[^a-z])", re.I)  # "token" as a word: not max_new_tokens
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")
# A dead server would otherwise block each call for minutes (7 retries, 120 s timeout by default).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def _env_int(name: str) -> "int | None":
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def redact_uri(uri: str) -> str:
    """Drop user:password@ from a URI before it goes into a log line."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _clean(items: Mapping[str, Any], limit: int) -> dict[str, str]:
    """str values, legal keys, no secret-looking keys, no secret env values, MLflow's length limits."""
    secrets = [v for k, v in os.environ.items() if _SECRET.search(k) and len(v) >= 8]
    out = {}
    for key, value in items.items():
        if _SECRET.search(str(key)):
            continue
        text = str(value)
        for s in secrets:
            text = text.replace(s, "***")
        out[_BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]] = text[:limit]
    return out


def git_sha(path: str) -> "str | None":
    try:
        res = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def run_tags(world_size: int) -> dict[str, Any]:
    """Where and what ran: host, world size, Slurm job, git commit, plus MLFLOW_TAGS (a JSON object)."""
    tags: dict[str, Any] = {"world_size": str(world_size), "hostname": socket.gethostname()}
    sha = git_sha(os.path.dirname(os.path.abspath(__file__)))
    if sha:
        tags["mlflow.source.git.commit"] = sha
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    raw = os.environ.get("MLFLOW_TAGS")
    try:
        extra = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        logger.warning("MLFLOW_TAGS must be a JSON object like '{\"team\": \"vision\"}'; ignored")
        extra = {}
    return {**tags, **extra}


def check_reachable(uri: str) -> None:
    """Fail fast on a server that is down: any HTTP answer counts as up (auth may guard /health)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"MLflow server {redact_uri(uri)} unreachable: {e}") from None


def prepare_server(uri: "str | None", check: bool = True) -> None:
    """For an http(s) store: short MLflow HTTP retries/timeouts (unless set), and fail fast when it is down."""
    if not (uri and uri.startswith(("http://", "https://"))):
        return
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if check:
        check_reachable(uri)


def local_artifact_location(uri: str) -> "str | None":
    """For a SQLite store, artifacts beside the database file (MLflow's default is ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or another store decides
    db = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    return Path(os.path.dirname(os.path.abspath(db)), "mlartifacts").as_uri()


class Tracker:
    """An MLflow run on rank 0; on other ranks (or with enabled=False) every method does nothing."""

    def __init__(self, rank: "int | None" = None, world_size: "int | None" = None, output_dir: "str | None" = None,
                 enabled: bool = True, retry_after_s: float = 300.0, tracking_uri: "str | None" = None,
                 experiment: "str | None" = None, attach_env_run: bool = True):
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
        self.dropped = 0  # calls skipped while the store was failing
        self._retry_after = retry_after_s
        self._retry_at = 0.0  # monotonic time before which calls are skipped
        self._warned = False

    def _fail(self, what: str, err: BaseException) -> None:
        self.dropped += 1
        self._retry_at = time.monotonic() + self._retry_after
        self._retry_after = min(2 * self._retry_after, 3600.0)
        if not self._warned:
            self._warned = True
            msg = redact_uri(f"{type(err).__name__}: {err}")[:500]
            logger.warning("MLflow tracking failed (%s): %s. Training goes on; tracking calls are skipped "
                           "and retried later.", what, msg)

    def _ready(self) -> bool:
        if not (self.active and self.run_id):
            return False
        if time.monotonic() < self._retry_at:
            self.dropped += 1
            return False
        return True

    def start(self, config, run_name: "str | None" = None, resume_run_id: "str | None" = None,
              tags: "Mapping[str, Any] | None" = None, world_size: "int | None" = None) -> "str | None":
        """Create (or reattach to) the run and log the flattened config; returns the run id or None."""
        if not self.active:
            return None
        self.world_size = world_size or self.world_size
        try:
            self._start(config, run_name, resume_run_id, dict(tags or {}))
        except Exception as e:  # any store error: train without tracking
            self._fail("start", e)
            self.run_id = None
            self.active = False
            return None
        self.log_params(config)
        return self.run_id

    def _start(self, config, run_name, resume_run_id, tags) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        output_dir = os.path.abspath(self.output_dir or config.train.output_dir)
        uri = self.tracking_uri = (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                   or f"sqlite:///{output_dir}/mlflow.db")
        artifact_location = local_artifact_location(uri)
        prepare_server(uri)
        self.client = client = MlflowClient(tracking_uri=uri)

        tags = {**run_tags(self.world_size), **tags}
        env_run = os.environ.get("MLFLOW_RUN_ID") if self.attach_env_run else None
        if env_run and resume_run_id and env_run != resume_run_id:
            logger.warning("MLFLOW_RUN_ID=%s differs from the checkpoint's run %s; logging into MLFLOW_RUN_ID",
                           env_run, resume_run_id)
        run_id = env_run or resume_run_id
        if run_id:
            try:
                client.get_run(run_id)
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self.set_tags({**tags, "resumed": "true"})
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
        self.run_id = client.create_run(exp_id, run_name=run_name, tags=_clean(tags, MAX_PARAM_VALUE)).info.run_id
        logger.info("MLflow: run %s in experiment %r at %s", self.run_id, name, redact_uri(uri))

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
            self._fail("attach", e)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED; a preempted run can be resumed into later."""
        if not (self.active and self.run_id):  # tried even while backing off: leave no run RUNNING
            return
        if self.dropped:
            logger.warning("MLflow: %d tracking calls were skipped while the store was failing", self.dropped)
        try:
            self.client.set_terminated(self.run_id, status=status.upper())
        except Exception as e:
            self._fail("end", e)

    def _log_batch(self, what: str, metrics=(), params=(), tags=()) -> None:
        """One log_batch per MLflow-sized chunk; a failure is reported, never raised."""
        try:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
            for items, kw in ((params, "params"), (tags, "tags")):
                for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    self.client.log_batch(self.run_id, **{kw: items[i:i + MAX_PARAMS_PER_BATCH]})
        except Exception as e:
            self._fail(what, e)

    def log_params(self, params) -> None:
        """Log a Config (flattened) or a dict; on a resumed run, changed values become tags, not errors."""
        if not self._ready():
            return
        from mlflow.entities import Param, RunTag

        items = _clean(params.flat() if hasattr(params, "flat") else dict(params), MAX_PARAM_VALUE)
        try:
            existing = self.client.get_run(self.run_id).data.params
            new = {k: v for k, v in items.items() if k not in existing}
            changed = {f"resume_changed.{k}"[:MAX_KEY]: v for k, v in items.items() if k in existing and existing[k] != v}
            if changed:
                logger.info("MLflow: %d params changed since the run started; logged as resume_changed.* tags",
                            len(changed))
        except Exception as e:
            self._fail("log_params", e)
            return
        self._log_batch("log_params", params=[Param(k, v) for k, v in new.items()],
                        tags=[RunTag(k, v) for k, v in changed.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers (and 1-element tensors) only; other values are skipped."""
        if not self._ready():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                batch.append(Metric(_BAD_KEY_CHARS.sub("_", key)[:MAX_KEY], float(value), now, int(step)))
        self._log_batch("log_metrics", metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._ready():
            return
        from mlflow.entities import RunTag

        self._log_batch("set_tags", tags=[RunTag(k, v) for k, v in _clean(tags, MAX_PARAM_VALUE).items()])

    def log_artifact(self, path: str, artifact_path: "str | None" = None) -> None:
        """Copy a file or a directory into the run's artifacts."""
        if not self._ready():
            return
        if not os.path.exists(path):
            logger.warning("MLflow: artifact %s does not exist; not logged", path)
            return
        try:
            if os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, artifact_path)
            else:
                self.client.log_artifact(self.run_id, path, artifact_path)
        except Exception as e:
            self._fail("log_artifact", e)


    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """A column -> values table the MLflow UI shows under the run's artifacts (e.g. per-category scores)."""
        if not self._ready():
            return
        try:
            self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)
        except Exception as e:
            self._fail("log_table", e)


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


if __name__ == "__main__":
    import sys

    print(summarize(sys.argv[1]))
