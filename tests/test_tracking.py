"""MLflow tracking: a real local server, the default SQLite store, resume into the same run, outages, ranks."""
from __future__ import annotations

import logging
import json
import os
import signal
import subprocess
import threading
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ilvr.config import load_config
from ilvr.training.loss_curve import plot_loss_curve
from ilvr.training import mlflow_store, run_record, tracking
from ilvr.training.run_record import truncate_metrics
from ilvr.training.tracking import Tracker
from ilvr.training.spawn import free_port

MLFLOW_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"]


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch):
    for name in MLFLOW_ENV + ["RANK", "WORLD_SIZE", "SLURM_JOB_ID"]:
        monkeypatch.delenv(name, raising=False)


def make_cfg(output_dir: Path):
    return load_config(None, [f"train.output_dir={output_dir}", "train.lr=3e-4"], check_paths=False)


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_a_bit(tracker: Tracker, tmp_path: Path, steps: range) -> None:
    for step in steps:
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4, "note": "not a number"}, step=step)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    tracker.log_artifact(str(artifact))


class Server:
    """A real `mlflow server` on a fixed port, backed by SQLite: it can be frozen, killed and restarted."""

    def __init__(self, tmp_path: Path):
        self.tmp_path, self.port, self.proc = tmp_path, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "server.log", "ab")

    def start(self) -> "Server":
        cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.tmp_path / 'server.db'}",
               "--artifacts-destination", str(self.tmp_path / "server_artifacts"), "--workers", "1"]
        # MLflow 3's server also starts a job runner and huey consumers (~10 processes) for features not used here
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + (self.tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.3)

    def signal(self, sig: int) -> None:
        """To the server's own group: gunicorn/uvicorn workers too."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    try:
        yield srv.start()
    finally:
        srv.close()


@pytest.fixture
def mlflow_server(server):
    return server.uri


@pytest.mark.slow
def test_real_server_log_and_resume(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ilvr-test")
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "vision"}')
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = make_cfg(tmp_path / "out")
    tracker = Tracker(rank=0, world_size=2)
    run_id = tracker.start(cfg, run_name="first", tags={"api_token": "hunter2-very-secret"})
    assert run_id
    run_a_bit(tracker, tmp_path, range(3))
    tracker.end("KILLED")  # preempted

    client = client_for(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "first"
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["data.batch_size"] == "1"
    assert len(run.data.params) == len(cfg.flat())
    assert run.data.tags["team"] == "vision" and run.data.tags["world_size"] == "2"
    assert run.data.tags["slurm_job_id"] == "4242" and run.data.tags["hostname"]
    assert "api_token" not in run.data.tags
    assert not any("hunter2" in v for v in list(run.data.tags.values()) + list(run.data.params.values()))
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert "note" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["notes.txt"]
    assert client.get_experiment(run.info.experiment_id).name == "ilvr-test"

    # the resumed job: the checkpoint's run id, a changed config value, more steps
    cfg2 = load_config(None, [f"train.output_dir={tmp_path / 'out'}", "train.lr=1e-4"], check_paths=False)
    resumed = Tracker(rank=0, world_size=2)
    assert resumed.start(cfg2, run_name="ignored", resume_run_id=run_id) == run_id
    resumed.log_metrics({"loss": 0.1}, step=3)
    resumed.end()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]
    assert run.data.params["train.lr"] == "0.0003"  # MLflow params are immutable
    assert run.data.tags["resume_changed.train.lr"] == "0.0001" and run.data.tags["resumed"] == "true"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_default_store_is_sqlite_in_output_dir(tmp_path):
    out = tmp_path / "out"
    tracker = Tracker(rank=0)
    run_id = tracker.start(make_cfg(out), run_name="local")
    run_a_bit(tracker, tmp_path, range(2))
    path = plot_loss_curve([{"step": 0, "loss": 2.0, "ce": 1.5}, {"step": 1, "loss": 1.0, "ce": 0.9}],
                           str(out / "loss_curve"))
    assert path.endswith(".png") and Path(path).read_bytes()[:4] == b"\x89PNG"
    tracker.log_artifact(path)
    tracker.end()
    assert (out / "mlflow.db").is_file()
    client = client_for(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "ilvr"
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["loss_curve.png", "notes.txt"]
    assert list((out / "mlartifacts").rglob("notes.txt"))
    # MLFLOW_RUN_ID-less resume through the checkpoint's run id, into the same local store
    again = Tracker(rank=0)
    assert again.start(make_cfg(out), resume_run_id=run_id) == run_id
    again.end()


def test_unknown_resume_run_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    tracker = Tracker(rank=0)
    run_id = tracker.start(make_cfg(tmp_path / "out"))
    assert run_id and run_id != "0123456789abcdef0123456789abcdef"
    tags = client_for(tracker.tracking_uri).get_run(run_id).data.tags
    assert tags["resumed_from_run_id"] == "0123456789abcdef0123456789abcdef"


def test_bad_tracking_uri_warns_once_and_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    tracker = Tracker(rank=0)
    with caplog.at_level(logging.WARNING, logger="ilvr.training.tracking"):
        t0 = time.monotonic()
        assert tracker.start(make_cfg(tmp_path / "out"), run_name="x") is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.set_tags({"a": "b"})
        tracker.log_artifact(__file__)
        tracker.end("FAILED")
    assert time.monotonic() - t0 < 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "127.0.0.1:1" in warnings[0].getMessage()  # once at start, once at the end:
    assert "--backfill" in warnings[1].getMessage()  # how to send the run when the store answers


def log_step(tracker: Tracker, out: Path, step: int) -> float:
    """What the trainer's _log does on rank 0: a metrics.jsonl line (a histogram too), then log_metrics.
    Returns the seconds log_metrics took."""
    metrics = {"loss": 1.0 / step, "lr": 1e-4, "latent/selected_hist": [1, 3]}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    t0 = time.perf_counter()
    tracker.log_metrics(mlflow_store.scalar_metrics(metrics), step=step)
    return time.perf_counter() - t0


def steps_of(client, run_id: str, key: str = "loss") -> list[int]:
    """Every logged point's step, duplicates included."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_failing_store_is_retried_without_blocking_or_losing(tmp_path, caplog):
    tracker = Tracker(rank=0, retry_after_s=0.2)
    run_id = tracker.start(make_cfg(tmp_path / "out"))
    real = tracker.client.log_batch
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # a slow, failing store
        raise ConnectionError("store went away")

    tracker.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="ilvr.training.tracking"):
        latency = []
        for step in range(5):
            t0 = time.perf_counter()
            tracker.log_metrics({"loss": 1.0}, step=step)
            latency.append(time.perf_counter() - t0)
        deadline = time.monotonic() + 20
        while len(calls) < 3 and time.monotonic() < deadline:  # retried with backoff
            time.sleep(0.05)
    assert max(latency) < 0.05 and len(calls) >= 3
    assert sum("store went away" in r.getMessage() for r in caplog.records) == 1  # once per outage
    tracker.client.log_batch = real
    tracker.log_metrics({"loss": 0.5}, step=9)
    tracker.end()
    assert steps_of(client_for(tracker.tracking_uri), run_id) == [0, 1, 2, 3, 4, 9]
    assert tracker.dropped == 0


def test_full_queue_drops_the_oldest_steps_and_backfills_them(tmp_path):
    """Memory stays bounded during an outage (max_pending calls); what fell out comes back from
    metrics.jsonl once the store answers, so MLflow still gets every step, once."""
    out = tmp_path / "out"
    tracker = Tracker(rank=0, retry_after_s=0.2, max_pending=3)
    run_id = tracker.start(make_cfg(out))
    real, calls = tracker.client.log_batch, []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("store went away")

    tracker.client.log_batch = broken
    for step in range(1, 51):
        log_step(tracker, out, step)
    deadline = time.monotonic() + 20
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.overflowed >= 50 - 3 - 1  # at most one more in flight
    tracker.client.log_batch = real
    tracker.end()
    assert tracker.backfilled == tracker.overflowed
    client = client_for(tracker.tracking_uri)
    assert steps_of(client, run_id) == list(range(1, 51))
    assert steps_of(client, run_id, "latent/selected_k1") == list(range(1, 51))


def test_refused_call_is_given_up_alone_and_counted(tmp_path):
    """A 4xx answer is not retried forever (it would block the queue): the refused step alone is lost,
    and `dropped` (what the evaluation ends FAILED on) counts it."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    tracker = Tracker(rank=0, end_timeout_s=10)
    run_id = tracker.start(make_cfg(tmp_path / "out"))
    real = tracker.client.log_batch

    def refuse_step_3(run_id, metrics=(), **kwargs):
        if any(m.step == 3 for m in metrics):
            raise MlflowException("no", error_code=INVALID_PARAMETER_VALUE)
        return real(run_id, metrics=metrics, **kwargs)

    tracker.client.log_batch = refuse_step_3
    for step in range(6):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.dropped == 1
    tracker.end("FAILED")
    run = client_for(tracker.tracking_uri).get_run(run_id)
    assert steps_of(client_for(tracker.tracking_uri), run_id) == [0, 1, 2, 4, 5] and run.info.status == "FAILED"


def test_dropped_waits_at_most_the_end_timeout(tmp_path):
    tracker = Tracker(rank=0, end_timeout_s=0.5)
    tracker.start(make_cfg(tmp_path / "out"))
    tracker.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down"))
    tracker.client.set_terminated = tracker.client.log_batch
    tracker.log_metrics({"loss": 1.0}, step=1)
    t0 = time.monotonic()
    assert tracker.dropped == 1
    tracker.end("FAILED")
    assert time.monotonic() - t0 < 3
    state = tracking.read_state(str(tmp_path / "out"))
    assert state["status"] == "FAILED" and not state["status_delivered"] and state["undelivered_steps"] == 1


@pytest.mark.slow
def test_frozen_server_never_stalls_training_and_loses_nothing(server, tmp_path, monkeypatch):
    """SIGSTOP the server mid-run (what stalled both ranks 47 s per call): log_metrics still returns at
    once, and after SIGCONT every step arrives, once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    out = tmp_path / "out"
    tracker = Tracker(rank=0, tracking_uri=server.uri, retry_after_s=1.0)
    run_id = tracker.start(make_cfg(out))
    for step in range(1, 6):
        log_step(tracker, out, step)
    assert tracker.flush(30)
    server.signal(signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        latency = []
        for step in range(6, 46):
            latency.append(log_step(tracker, out, step))
            time.sleep(0.1)  # a training step
        loop_s = time.perf_counter() - t0
    finally:
        server.signal(signal.SIGCONT)
    t1 = time.perf_counter()
    tracker.end()
    print(f"frozen server: log_metrics max {max(latency) * 1e3:.3f} ms, mean {sum(latency) / len(latency) * 1e6:.1f}"
          f" us; 40 steps of 0.1 s took {loop_s:.2f} s; end() after SIGCONT {time.perf_counter() - t1:.2f} s")
    assert max(latency) < 0.05 and loop_s < 40 * 0.1 + 1.0
    client = client_for(server.uri)
    assert steps_of(client, run_id) == list(range(1, 46))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_killed_server_is_retried_and_backfilled_and_the_run_ends_finished(server, tmp_path):
    """Kill the server mid-run; the queue (4 calls) overflows, so most steps exist only in metrics.jsonl.
    The server comes back (same port and store) while end() waits: every step arrives, once, FINISHED."""
    out = tmp_path / "out"
    tracker = Tracker(rank=0, tracking_uri=server.uri, retry_after_s=0.5, max_pending=4, end_timeout_s=120)
    run_id = tracker.start(make_cfg(out))
    for step in range(1, 6):
        log_step(tracker, out, step)
    assert tracker.flush(30)
    server.kill()
    latency = [log_step(tracker, out, step) for step in range(6, 26) if time.sleep(0.05) is None]
    assert max(latency) < 0.05
    restart = threading.Thread(target=server.start)
    restart.start()
    try:
        t0 = time.perf_counter()
        tracker.end()
        end_s = time.perf_counter() - t0
    finally:
        restart.join()
    print(f"killed server: log_metrics max {max(latency) * 1e3:.3f} ms; {tracker.overflowed} steps overflowed the "
          f"queue and {tracker.backfilled} were backfilled; end() took {end_s:.1f} s (server restart included)")
    assert tracker.overflowed > 0 and tracker.backfilled == tracker.overflowed
    client = client_for(server.uri)
    assert steps_of(client, run_id) == list(range(1, 26))
    assert steps_of(client, run_id, "latent/selected_k2") == list(range(1, 26))  # the trainer's conversion
    assert client.get_run(run_id).info.status == "FINISHED"
    state = tracking.read_state(str(out))
    assert state["status"] == "FINISHED" and state["status_delivered"] and state["undelivered_steps"] == 0


@pytest.mark.slow
def test_server_down_past_the_deadline_is_recorded_then_backfilled(server, tmp_path, caplog, capfd, monkeypatch):
    """end() gives up after end_timeout_s, says what is missing and how to send it; the backfill command
    delivers the steps and the status later. The URI's password never reaches a log line or a file."""
    secret_uri = f"http://ilvr:s3cr3t-pw-0042@127.0.0.1:{server.port}"
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    out = tmp_path / "out"
    tracker = Tracker(rank=0, tracking_uri=secret_uri, retry_after_s=0.5, end_timeout_s=2)
    with caplog.at_level(logging.INFO, logger="ilvr.training.tracking"):
        run_id = tracker.start(make_cfg(out))
        for step in range(1, 4):
            log_step(tracker, out, step)
        assert tracker.flush(30)
        server.kill()
        for step in range(4, 11):
            log_step(tracker, out, step)
        t0 = time.monotonic()
        tracker.end("KILLED")
        assert time.monotonic() - t0 < 2 + 2
    state_text = (out / tracking.STATE_FILE).read_text()
    state = json.loads(state_text)
    assert state["status"] == "KILLED" and not state["status_delivered"]
    assert state["undelivered_steps"] == 7 and state["undelivered_from"] == 4
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "--backfill" in said and "7 logged steps" in said
    assert "s3cr3t" not in said + state_text

    server.start()
    assert client_for(server.uri).get_run(run_id).info.status == "RUNNING"  # the killed job's end never arrived
    assert tracking.main([str(out), "--backfill"]) == 2  # the recorded URI is redacted: say where to connect
    assert tracking.main([str(out), "--backfill", "--tracking-uri", secret_uri]) == 0
    client = client_for(server.uri)
    assert steps_of(client, run_id) == list(range(1, 11))
    assert client.get_run(run_id).info.status == "KILLED"
    assert tracking.main([str(out), "--backfill", "--tracking-uri", server.uri]) == 0  # idempotent
    assert steps_of(client, run_id) == list(range(1, 11))
    assert tracking.read_state(str(out))["status_delivered"]
    assert "s3cr3t" not in "".join(capfd.readouterr())  # nor MLflow's own run links on stdout


CHILD = """
import json, os, sys, time
from ilvr.config import load_config
from ilvr.training.tracking import Tracker

out, how = sys.argv[1], sys.argv[2]
tracker = Tracker(rank=0, end_on_exit="FAILED")  # as the trainer makes it
print(tracker.start(load_config(None, [f"train.output_dir={out}"], check_paths=False)), flush=True)

def log(step):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\\n")
    tracker.log_metrics({"loss": 1.0 / step}, step=step)

for step in range(1, 6):
    log(step)
assert tracker.flush(30)
if how == "raise":
    raise RuntimeError("a bug outside the training loop")
def down(*args, **kwargs):
    raise ConnectionError("store down")
tracker.client.log_batch = down
for step in range(6, 11):
    log(step)
time.sleep(0.3)
os.kill(os.getpid(), 9)  # OOM killer, node failure: nothing in the process can react
"""


def run_child(out: Path, how: str) -> tuple[subprocess.CompletedProcess, str]:
    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), how], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, proc.stdout.split()[0]


@pytest.mark.slow
def test_process_that_dies_never_leaves_a_run_running_for_good(tmp_path):
    # an exception that escapes (setup failing after start, a bug): the exit hook ends the run FAILED
    proc, run_id = run_child(tmp_path / "raised", "raise")
    assert proc.returncode == 1 and "a bug outside" in proc.stderr
    client = client_for(f"sqlite:///{tmp_path / 'raised' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED" and steps_of(client, run_id) == [1, 2, 3, 4, 5]

    # SIGKILL with steps 6-10 undelivered: RUNNING in MLflow and in mlflow_run.json (with the dead pid)
    for name in ("resumed", "backfilled"):
        proc, run_id = run_child(tmp_path / name, "kill")
        assert proc.returncode == -9
        client = client_for(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert client.get_run(run_id).info.status == "RUNNING" and steps_of(client, run_id) == [1, 2, 3, 4, 5]
        assert tracking.read_state(str(tmp_path / name))["status"] == "RUNNING"
    # the next job resumes the same run and backfills what the dead one could not send
    tracker = Tracker(rank=0)
    client = client_for(f"sqlite:///{tmp_path / 'resumed' / 'mlflow.db'}")
    run_id = client.search_runs([e.experiment_id for e in client.search_experiments()])[0].info.run_id
    assert tracker.start(make_cfg(tmp_path / "resumed"), resume_run_id=run_id) == run_id
    log_step(tracker, tmp_path / "resumed", 11)
    tracker.end()
    assert steps_of(client, run_id) == list(range(1, 12)) and client.get_run(run_id).info.status == "FINISHED"
    # or nobody resumes: the backfill command sees the process is gone and marks the run KILLED
    out = tmp_path / "backfilled"
    assert tracking.main([str(out), "--backfill"]) == 0
    client = client_for(f"sqlite:///{out / 'mlflow.db'}")
    run_id = tracking.read_state(str(out))["run_id"]
    assert steps_of(client, run_id) == list(range(1, 11)) and client.get_run(run_id).info.status == "KILLED"


def test_resume_truncates_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
    path.write_text("\n".join(lines[:8]) + "\nnot json\n" + "\n".join(lines[8:]) + '\n{"step": 11, "lo')  # torn
    assert truncate_metrics(str(path), 6) == 6
    assert path.read_text() == "".join(line + "\n" for line in lines[:6])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    assert truncate_metrics(str(path), 6) == 0 and truncate_metrics(str(tmp_path / "none.jsonl"), 3) == 0


class Inert:
    """Any method, any arguments: does nothing, returns None."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_trainer_resume_truncates_metrics_jsonl(tmp_path, monkeypatch):
    """The wiring: Trainer._resume on rank 0 cuts metrics.jsonl back to the checkpoint's step."""
    from types import SimpleNamespace

    from ilvr.training import checkpoint
    from ilvr.training.distributed import DistInfo
    from ilvr.training.trainer import Trainer

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)))
    trainer = Trainer(make_cfg(out), ds_config={}, resume="auto")
    trainer.info = DistInfo(rank=0, world_size=1, local_rank=0)
    trainer.teacher, trainer.engine = None, None
    trainer.loader = Inert()
    trainer.checkpoints = SimpleNamespace(load=lambda *a, **k: ({"step": 5, "mlflow_run_id": "r"}, {"loader": {}}))
    monkeypatch.setattr(checkpoint, "resolve_resume", lambda *a, **k: str(out / "checkpoints" / "step-5"))
    assert trainer._resume() == "r"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_other_ranks_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker()
    assert tracker.rank == 1 and not tracker.active
    assert tracker.start(make_cfg(tmp_path / "out"), run_name="x") is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_params({"a": 1})
    tracker.log_artifact(__file__)
    tracker.end()
    assert tracker.client is None and not (tmp_path / "out").exists()
    assert not Tracker(rank=0, enabled=False).start(make_cfg(tmp_path / "out"))


def test_loss_curve_svg_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = plot_loss_curve({"loss": [(0, 3.0), (1, 2.0), (2, 1.5)], "a<b": [(0, 1.0), (2, 0.5)]},
                           str(tmp_path / "curve.png"))
    assert path.endswith("curve.svg")
    text = Path(path).read_text()
    assert text.startswith("<svg") and text.count("<polyline") == 2 and "a&lt;b" in text
    import xml.dom.minidom

    xml.dom.minidom.parseString(text)  # well-formed
    assert plot_loss_curve([], str(tmp_path / "empty.svg")).endswith("empty.svg")


def test_a_moved_run_dir_still_opens_its_store_and_artifacts(tmp_path):
    """MLflow stores absolute artifact URIs: after `mv run_a run_b` the run dir's record still finds the store,
    readers find the artifacts beside the moved db, and the next writer points the store at its new place."""
    from mlflow import MlflowClient

    tracker = Tracker(rank=0)
    run_id = tracker.start(make_cfg(tmp_path / "a" / "run"))
    run_a_bit(tracker, tmp_path, range(2))
    tracker.end("FINISHED")
    state = tracking.read_state(str(tmp_path / "a" / "run"))
    assert state["tracking_db"] == "mlflow.db" and state["tracking_uri"].endswith("/a/run/mlflow.db")

    os.rename(tmp_path / "a", tmp_path / "b")
    moved = tmp_path / "b" / "run"
    uri, found_id = run_record.run_store(str(moved))
    assert (uri, found_id) == (f"sqlite:///{moved}/mlflow.db", run_id)
    stale = MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri
    assert "/a/run/mlartifacts/" in stale  # what MLflow recorded: the old place
    assert (Path(mlflow_store.artifact_dir(stale, uri)) / "notes.txt").read_text() == "hello"  # read-time resolution

    later = Tracker(rank=0, output_dir=str(tmp_path / "eval"), tracking_uri=uri, experiment="ilvr")
    later.start({"mode": "latent"})  # a writer (an evaluation) relocates the store once
    later.log_artifact(str(tmp_path / "notes.txt"))
    later.end("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    for rid in (run_id, later.run_id):  # stock MLflow (what `mlflow ui` uses) opens both runs' artifacts
        assert Path(client.download_artifacts(rid, "notes.txt", str(tmp_path))).read_text() == "hello"
        assert client.get_run(rid).info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    assert not (tmp_path / "a").exists()  # nothing was written at the old place
    assert tracking.relocate_artifacts(uri) == 0  # done once


def test_connectable_uri_never_uses_a_redacted_or_missing_store(tmp_path, monkeypatch):
    recorded = tracking.redact_uri("https://alice:pw@mlflow.example")
    assert mlflow_store.connectable_uri(recorded) is None  # credentials are not recorded: no way to connect
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:pw@mlflow.example")
    assert mlflow_store.connectable_uri(recorded) == "https://alice:pw@mlflow.example"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:pw@other.example")
    assert mlflow_store.connectable_uri(recorded) is None  # another server's credentials
    assert mlflow_store.connectable_uri(f"sqlite:///{tmp_path}/gone.db") is None  # MLflow would create an empty one
    assert mlflow_store.connectable_uri("http://mlflow:5000") == "http://mlflow:5000"
    record = tracking.store_record(f"sqlite:///{tmp_path}/run/mlflow.db", "abc", str(tmp_path / "export"))
    assert record == {"run_id": "abc", "tracking_uri": f"sqlite:///{tmp_path}/run/mlflow.db",
                      "tracking_db": "../run/mlflow.db"}


def start_without_the_store(out: Path, uri: str, steps: range, status: str) -> None:
    """A training process whose MLflow store is unreachable at start: it trains, logs metrics.jsonl, ends."""
    out.mkdir(parents=True, exist_ok=True)  # the trainer makes it before the tracker starts
    tracker = Tracker(rank=0, tracking_uri=uri, end_on_exit="FAILED")
    assert tracker.start(make_cfg(out), run_name=out.name) is None
    make_cfg(out).save(str(out / "config.resolved.yaml"))  # as the trainer records it
    for step in steps:
        log_step(tracker, out, step)
    tracker.end(status)


@pytest.mark.slow
def test_a_store_down_at_start_is_recorded_and_backfilled_without_hand_edits(tmp_path, caplog):
    """Before: nothing recorded that the run had no MLflow run, and `--backfill` refused the directory
    (`no mlflow_run.json`): the steps could only reach MLflow by hand."""
    srv = Server(tmp_path)  # not started yet: its port refuses connections
    out = tmp_path / "out"
    try:
        with caplog.at_level(logging.WARNING, logger="ilvr.training.tracking"):
            start_without_the_store(out, srv.uri, range(1, 6), "FINISHED")
        assert os.path.isfile(out / tracking.STATE_FILE), "the run's record for a later --backfill"
        state = json.loads((out / tracking.STATE_FILE).read_text())
        assert state["run_id"] is None and state["status"] == "FINISHED" and "ConnectionError" in state["start_failed"]
        assert state["undelivered_steps"] == 5 and "--backfill" in caplog.text
        srv.start()
        assert tracking.main([str(out), "--backfill"]) == 0
        state = tracking.read_state(str(out))
        client = client_for(srv.uri)
        run = client.get_run(state["run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == "out" and run.data.params["train.lr"] == "0.0003"
        assert steps_of(client, state["run_id"]) == [1, 2, 3, 4, 5] and state["status_delivered"]
        assert tracking.main([str(out), "--backfill"]) == 0  # again: the same run, nothing twice
        assert steps_of(client, state["run_id"]) == [1, 2, 3, 4, 5]
        resumed = Tracker(rank=0, tracking_uri=srv.uri)  # a resume whose checkpoint has no run id
        assert resumed.start(make_cfg(out)) == state["run_id"]
        log_step(resumed, out, 6)
        resumed.end("FINISHED")
        assert steps_of(client, state["run_id"]) == [1, 2, 3, 4, 5, 6]
        assert len(client.search_runs([run.info.experiment_id])) == 1
    finally:
        srv.close()


def test_a_resume_with_the_store_back_sends_the_steps_of_a_start_without_it(tmp_path):
    out = tmp_path / "out"
    start_without_the_store(out, f"http://127.0.0.1:{free_port()}", range(1, 4), "KILLED")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracker = Tracker(rank=0, tracking_uri=uri)
    run_id = tracker.start(make_cfg(out))
    log_step(tracker, out, 4)
    tracker.end("FINISHED")
    assert steps_of(client_for(uri), run_id) == [1, 2, 3, 4]
    assert tracking.read_state(str(out))["run_id"] == run_id
