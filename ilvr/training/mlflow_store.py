"""Talking to an MLflow store: what may be sent (clean values, legal keys, no secrets), run tags and names,
the server's reachability, and where a run's store and artifacts are (also after its run dir moved)."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import subprocess
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




def redact_uri(uri: str) -> str:
    """Drop user:password@ from a URI before it goes into a log line."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def clean_values(items: Mapping[str, Any], limit: int) -> dict[str, str]:
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


@functools.lru_cache(maxsize=4096)
def _metric_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def metric_values(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(legal key, float) for numbers and 1-element tensors; other values are skipped."""
    out = []
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((_metric_key(key), float(value)))
    return out


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What MLflow can plot of a metrics.jsonl line: numbers as they are, a histogram (list) as one
    fraction per bucket (`x_hist` -> `x_k1 .. x_kK`). The trainer's conversion: a backfill must match it."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                continue
            total = sum(value) or 1
            stem = key[:-len("_hist")] if key.endswith("_hist") else key
            out.update({f"{stem}_k{j + 1}": v / total for j, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
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


def unique_run_name(client, experiment_id: str, name: "str | None") -> "str | None":
    """`name`, or `name-2`, `name-3`, ...: the first that no run of the experiment has. MLflow allows
    duplicates, and two runs both called vsp-latent-step600 cannot be told apart in its UI or a report."""
    if not name:
        return name
    from mlflow.entities import ViewType

    prefix = re.split("[\"'\\\\]", name)[0]  # LIKE on the part before any quote or backslash (only widens)
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{prefix}%'",
                              run_view_type=ViewType.ALL, max_results=50000)
    taken = {r.info.run_name for r in runs}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def check_reachable(uri: str) -> None:
    """Fail fast on a server that is down: any HTTP answer counts as up (auth may guard /health)."""
    url = re.sub(r"//[^/@]*@", "//", uri.rstrip("/")) + "/health"  # urllib cannot take user:password@
    try:
        urllib.request.urlopen(url, timeout=5).close()
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
    if redact_uri(uri) != uri:  # MLflow prints run links with the URI's user:password@ to stdout
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if check:
        check_reachable(uri)


def local_artifact_location(uri: str) -> "str | None":
    """For a SQLite store, artifacts beside the database file (MLflow's default is ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or another store decides
    db = uri[len("sqlite:///"):]
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    return Path(os.path.dirname(os.path.abspath(db)), "mlartifacts").as_uri()


# ---------------------------------------------------------------------- the store of a run
# MLflow keeps absolute artifact URIs (per experiment and per run) in its database, so a SQLite store whose
# directory was moved or copied would point at the old place. Our SQLite stores keep their artifacts in
# `<db dir>/mlartifacts`; readers map a stale `.../mlartifacts/<rest>` there (artifact_dir), writers
# rewrite the stale URIs once (relocate_artifacts, also `python -m ilvr.training.tracking RUN_DIR --relocate`).
ARTIFACTS_DIR = "mlartifacts"


def sqlite_path(uri: "str | None") -> "str | None":
    """The database file of a sqlite:/// URI (absolute), else None."""
    if not (uri and uri.startswith("sqlite:///")):
        return None
    return os.path.abspath(uri[len("sqlite:///"):])


def connectable_uri(recorded: "str | None", db_relative: "str | None" = None, base: "str | None" = None) \
        -> "str | None":
    """A URI to connect with from what a run recorded: its SQLite file relative to `base` (the store moved or
    was copied with the run), else the recorded URI if its file exists; a URI recorded without its credentials
    (`//***@`) only as MLFLOW_TRACKING_URI, when that names the same server. None: no usable store."""
    if db_relative and base and os.path.isfile(os.path.join(base, db_relative)):
        return "sqlite:///" + os.path.abspath(os.path.join(base, db_relative))
    if not recorded:
        return None
    if "//***@" in recorded:
        env = os.environ.get("MLFLOW_TRACKING_URI", "")
        return env if env and redact_uri(env) == recorded else None
    db = sqlite_path(recorded)
    return recorded if db is None or os.path.isfile(db) else None


def store_record(uri: "str | None", run_id: "str | None", base: str) -> "dict | None":
    """What a run dir or an export records about its MLflow run: the id, the URI without credentials and,
    for SQLite, the database path relative to `base` (so a moved directory still finds its store)."""
    if not run_id:
        return None
    record = {"run_id": run_id, "tracking_uri": redact_uri(uri or "")}
    db = sqlite_path(uri)
    if db:
        record["tracking_db"] = os.path.relpath(db, os.path.abspath(base))
    return record


def artifact_dir(artifact_uri: str, tracking_uri: "str | None") -> "str | None":
    """The local directory of a run's artifacts, or None when they are not local files. A SQLite store that
    moved: the recorded `.../mlartifacts/<rest>` is looked up beside the database instead."""
    if not artifact_uri.startswith("file:"):
        return None
    from mlflow.utils.file_utils import local_file_uri_to_path

    path = local_file_uri_to_path(artifact_uri)
    db = sqlite_path(tracking_uri)
    marker = f"/{ARTIFACTS_DIR}/"
    if os.path.isdir(path) or db is None or marker not in path:
        return path
    return os.path.join(os.path.dirname(db), ARTIFACTS_DIR, path.rpartition(marker)[2])


def relocate_artifacts(uri: "str | None") -> int:
    """Point a moved or copied SQLite store's artifact URIs at `<db dir>/mlartifacts` (where ours keep them);
    returns the number of experiments rewritten. Only `.../mlartifacts` roots that are not this one and either
    no longer exist or are shadowed by a local `mlartifacts` are touched; other stores are left alone."""
    import sqlite3

    from mlflow.utils.file_utils import local_file_uri_to_path

    db = sqlite_path(uri)
    if db is None or not os.path.isfile(db):
        return 0
    here = os.path.join(os.path.dirname(db), ARTIFACTS_DIR)
    root = Path(here).as_uri()
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"experiments", "runs"} <= tables:
                return 0
            olds = {r[0] for r in con.execute("SELECT artifact_location FROM experiments WHERE artifact_location "
                                              "LIKE 'file:%/" + ARTIFACTS_DIR + "'")}
            olds = {o for o in olds if o != root and (os.path.isdir(here) or
                                                      not os.path.isdir(local_file_uri_to_path(o)))}
            for old in olds:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (root, old))
                for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
                    if table in tables:
                        con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                    f"WHERE substr({column}, 1, ?) = ?", (root, len(old) + 1, len(old) + 1,
                                                                          old + "/"))
    finally:
        con.close()
    if olds:
        logger.info("MLflow: %s moved; its artifact locations now point at %s", db, here)
    return len(olds)
