"""MLflow as people read it: run names never repeat in an experiment, every run says what it is (ilvr.kind), and
an evaluation run's duration covers its decoding."""
from __future__ import annotations

import time

import pytest

from ilvr.config import load_config
from ilvr.training.tracking import Tracker

MLFLOW_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"]


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch):
    for name in MLFLOW_ENV + ["RANK", "WORLD_SIZE", "SLURM_JOB_ID"]:
        monkeypatch.delenv(name, raising=False)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_repeated_run_name_gets_a_suffix_and_start_time_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [f"train.output_dir={tmp_path}"], check_paths=False)
    names, ids = ["vsp-latent-step600"] * 3 + ["it's-vsp-latent"] * 2, []
    began = time.time() - 3600
    for i, name in enumerate(names):
        tracker = Tracker(rank=0, tracking_uri=uri, attach_env_run=False)
        ids.append(tracker.start(cfg, run_name=name, tags={"ilvr.kind": "eval"}, start_time=began if i == 0 else None))
        tracker.end()
    client = _client(uri)
    runs = [client.get_run(i) for i in ids]
    assert [r.info.run_name for r in runs] == ["vsp-latent-step600", "vsp-latent-step600-2", "vsp-latent-step600-3",
                                               "it's-vsp-latent", "it's-vsp-latent-2"]
    assert runs[0].info.start_time == int(began * 1000)  # the work began before the run was created
    assert runs[1].info.start_time > int(began * 1000) + 3000 * 1000


def test_evaluation_runs_last_as_long_as_their_decoding(tmp_path, monkeypatch, tiny, tiny_model_factory):
    """run_evaluation's MLflow run starts when the evaluation starts, not when its results are logged; it is
    tagged ilvr.kind=eval."""
    from ilvr.evaluation import evaluate
    from ilvr.evaluation.loading import load_eval_model
    from ilvr.export import export_model
    from tests.test_evaluation import write_vsp_shards

    exported = str(tmp_path / "exported")
    export_model(tiny_model_factory(seed=1), tiny[0], exported, {"latent_size": 4, "step": 7, "stage": "2"})
    shards = write_vsp_shards(str(tmp_path / "shards"), 2)
    real_decode = evaluate.decode_records

    def slow_decode(*args, **kwargs):
        time.sleep(2.0)  # stands for minutes of decoding, all before the first MLflow call
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(evaluate, "decode_records", slow_decode)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    req = evaluate.EvalRequest(model=exported, shards=shards, out_dir=str(tmp_path / "eval"), tracking_uri=uri,
                               decode=evaluate.DecodeSettings(mode="text", max_new_tokens=4, batch_size=2))
    result = evaluate.run_evaluation(req, em=load_eval_model(exported, dtype="fp32"))
    run = _client(uri).get_run(result["mlflow_run_id"])
    assert run.info.end_time - run.info.start_time >= 2000
    assert run.data.tags["ilvr.kind"] == "eval"
