"""MLflow tracking: a real local server, the default SQLite store, resume into the same run, outages, ranks."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ilvr.config import load_config
from ilvr.training.loss_curve import plot_loss_curve
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


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free port, backed by SQLite; killed afterwards."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)  # the server's own group: gunicorn/uvicorn workers go with it
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


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
    assert len(warnings) == 1 and "127.0.0.1:1" in warnings[0].getMessage()


def test_store_failing_mid_run_is_skipped_then_retried(tmp_path, caplog):
    tracker = Tracker(rank=0, retry_after_s=0.2)
    run_id = tracker.start(make_cfg(tmp_path / "out"))
    real = tracker.client.log_batch
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("store went away")

    tracker.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="ilvr.training.tracking"):
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)  # 1 real try, then skipped
    assert len(calls) == 1 and tracker.dropped == 5
    assert sum("store went away" in r.getMessage() for r in caplog.records) == 1
    tracker.client.log_batch = real
    time.sleep(0.25)
    tracker.log_metrics({"loss": 0.5}, step=9)
    tracker.end()
    history = client_for(tracker.tracking_uri).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [9]


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
