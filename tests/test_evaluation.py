"""Evaluation end to end: three decoding modes, outputs, MLflow runs, report; data parallel = one process;
the quick-start model trained on 2 ZeRO-3 ranks -> export -> `ilvr-eval` CLI -> sweep -> `ilvr-report`."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from data_pipeline.records import record_to_sample
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.synthetic_vsp import read as synthetic
from ilvr.evaluation.evaluate import DecodeSettings, EvalRequest, run_evaluation
from ilvr.evaluation.loading import load_eval_model
from ilvr.export import export_model
from ilvr.model.generate import MODES
from ilvr.training.spawn import run_on_ranks
from tests.conftest import REPO
from tests.factories import logit_bias
from tests.test_train import env as train_env

LATENT_BIAS = 1.0  # on <|latent_start|>: makes the random tiny model open latent segments (0.4 is too weak here)
ROW_FIELDS = {"id", "prompt", "prediction", "gold", "latent_segments", "num_tokens", "latency_ms", "parsed",
              "correct", "category", "finished"}


def write_vsp_shards(out: str, n: int, seed: int = 3) -> str:
    writer = ShardWriter(out, prefix="eval", samples_per_shard=4)
    for i, rec in enumerate(synthetic(num_samples=n, seed=seed, min_size=3, max_size=4)):
        writer.write(record_to_sample(rec, i))
    writer.close()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny, tiny_model_factory) -> str:
    """A random tiny model exported like `ilvr-export` does (step 7, K = 4)."""
    processor, _ = tiny
    out = str(tmp_path_factory.mktemp("exported"))
    export_model(tiny_model_factory(seed=1), processor, out, {"latent_size": 4, "step": 7, "stage": "2"})
    return out


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> str:
    return write_vsp_shards(str(tmp_path_factory.mktemp("eval_shards")), 6)


def test_every_mode_outputs_mlflow_and_report(tmp_path, exported, eval_shards, tiny):
    import mlflow

    from ilvr.evaluation.report import main as report_main

    _, latent_ids = tiny
    em = load_eval_model(exported, dtype="fp32")
    assert (em.step, em.latent_size) == (7, 4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = {}
    with logit_bias(em.model, latent_ids.start, LATENT_BIAS):
        for mode in MODES:  # batches of 5 and 1: shuffled-latent borrows a donor for the last one
            req = EvalRequest(model=exported, shards=eval_shards, out_dir=str(tmp_path / mode), tracking_uri=uri,
                              decode=DecodeSettings(mode=mode, max_new_tokens=24, batch_size=5))
            results[mode] = run_evaluation(req, em=em)

    for mode, result in results.items():
        rows = [json.loads(line) for line in open(tmp_path / mode / "predictions.jsonl", encoding="utf-8")]
        assert [r["id"] for r in rows] == [f"synvsp-s3-{i:06d}" for i in range(6)]
        assert all(ROW_FIELDS <= set(r) for r in rows)
        assert all(r["gold"] and set(r["gold"]) <= set("LRUD,") for r in rows), rows  # the reference plan
        on_disk = json.load(open(tmp_path / mode / "metrics.json", encoding="utf-8"))
        assert on_disk["metrics"] == result["metrics"] and on_disk["mlflow_run_id"]
        m = result["metrics"]
        assert m["num_samples"] == 6 and m["num_correct"] == sum(r["correct"] for r in rows)
        assert m["unparseable"] == sum(r["parsed"] is None for r in rows)
        assert m["tokens_per_s"] > 0 and m["latency_ms_p90"] >= m["latency_ms_p50"] > 0
        segments = sum(r["latent_segments"] for r in rows)
        assert (segments == 0) if mode == "text" else (segments > 0), (mode, segments)

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`ilvr.kind` = 'eval'")
    assert sorted(r.data.params["mode"] for r in runs) == sorted(MODES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["checkpoint_step"] == "7" and run.data.params["benchmark"] == "vsp"
        assert "accuracy" in run.data.metrics and "latency_ms_mean" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"predictions.jsonl", "metrics.json"}

    report = tmp_path / "report.html"
    assert report_main(["--tracking-uri", uri, "--out", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    assert all(mode in html for mode in ("latent", "text", "constant-latent"))
    assert (tmp_path / "report.md").is_file()


def _evaluate_on_rank(rank: int, world_size: int, exported: str, shards: str, out: str, latent_start: int):
    em = load_eval_model(exported, dtype="fp32")
    req = EvalRequest(model=exported, shards=shards, out_dir=out, mlflow=False,
                      decode=DecodeSettings(max_new_tokens=16, batch_size=1))
    with logit_bias(em.model, latent_start, LATENT_BIAS):
        return run_evaluation(req, em=em)["metrics"]["num_samples"]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_predictions(tmp_path, exported, eval_shards, tiny):
    _, latent_ids = tiny
    kw = dict(exported=exported, shards=eval_shards, latent_start=latent_ids.start)
    _evaluate_on_rank(0, 1, out=str(tmp_path / "one"), **kw)
    assert run_on_ranks(_evaluate_on_rank, world_size=2, timeout=300, out=str(tmp_path / "two"), **kw) == [6, 6]

    def rows(name):  # batch size 1 on both sides: the same computation per sample, so exact equality
        lines = open(tmp_path / name / "predictions.jsonl", encoding="utf-8").read().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "latency_ms"} for line in lines]

    assert rows("one") == rows("two")
    one, two = (json.load(open(tmp_path / n / "metrics.json"))["metrics"] for n in ("one", "two"))
    assert {k: v for k, v in one.items() if "latency" not in k and "_per_s" not in k and k != "wall_s"} == \
           {k: v for k, v in two.items() if "latency" not in k and "_per_s" not in k and k != "wall_s"}
    assert json.load(open(tmp_path / "two" / "metrics.json"))["params"]["world_size"] == 2


@pytest.fixture
def training_run(tmp_path, tiny_processor_dir, tiny_model_factory, monkeypatch):
    """A training run dir with its MLflow run (the default SQLite store) and two fake checkpoints (step 5, 10)
    whose "consolidation" is counted: every call of model_from_checkpoint consolidates a ZeRO checkpoint once."""
    import shutil

    import ilvr.evaluation.loading as loading
    from ilvr.config import load_config
    from ilvr.training.tracking import Tracker

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    tracker = Tracker(rank=0)
    run_id = tracker.start(load_config(None, [f"train.output_dir={run}"], check_paths=False))
    tracker.end("FINISHED")
    for step in (5, 10):
        ckpt = run / "checkpoints" / f"step-{step}"
        shutil.copytree(tiny_processor_dir, ckpt / "processor")
        (ckpt / "trainer.json").write_text(json.dumps({"step": step, "mlflow_run_id": run_id,
                                                       "config": {"model": {"latent_size": 4}}}))
        (ckpt / "COMPLETE").write_text("{}")
    consolidated = []

    def fake_model_from_checkpoint(directory, dtype):
        consolidated.append(os.path.basename(directory))
        return tiny_model_factory(seed=1)

    monkeypatch.setattr(loading, "model_from_checkpoint", fake_model_from_checkpoint)
    return {"dir": run, "run_id": run_id, "uri": f"sqlite:///{run}/mlflow.db", "consolidated": consolidated}


def _eval_runs(uri: str) -> list:
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`ilvr.kind` = 'eval'")


def test_evaluations_log_beside_their_training_run(training_run, tmp_path, tiny, tiny_model_factory, eval_shards):
    """An export records its training run's store (ilvr_settings.json `mlflow`), a checkpoint its run id
    (trainer.json) and run dir (mlflow_run.json): evaluations go into that store and experiment, tagged."""
    import mlflow

    from ilvr.evaluation.evaluate import training_origin
    from ilvr.training.mlflow_store import store_record

    run = training_run
    processor, _ = tiny
    export = str(tmp_path / "export")
    export_model(tiny_model_factory(seed=1), processor, export,
                 {"latent_size": 4, "step": 10, "mlflow": store_record(run["uri"], run["run_id"], export)})
    for model, kind in ((export, "exported"), (str(run["dir"] / "checkpoints" / "step-5"), "checkpoint"),
                        (str(run["dir"]), "checkpoint")):
        origin = training_origin(model)
        assert (origin.model_kind, origin.run_id, origin.tracking_uri) == (kind, run["run_id"], run["uri"]), model

    result = run_evaluation(EvalRequest(model=export, shards=eval_shards, out_dir=str(tmp_path / "eval"),
                                        decode=DecodeSettings(max_new_tokens=4, batch_size=6)))
    assert not (tmp_path / "eval" / "mlflow.db").exists()  # no store of its own
    client = mlflow.tracking.MlflowClient(run["uri"])
    ev = client.get_run(result["mlflow_run_id"])
    train = client.get_run(run["run_id"])
    assert ev.info.experiment_id == train.info.experiment_id  # shown together in the MLflow UI
    assert {k: ev.data.tags[k] for k in ("ilvr.train_run_id", "ilvr.checkpoint_step", "ilvr.model_kind")} == \
        {"ilvr.train_run_id": run["run_id"], "ilvr.checkpoint_step": "10", "ilvr.model_kind": "exported"}


def test_a_sweep_loads_each_checkpoint_once(training_run, tmp_path, eval_shards, capsys):
    """2 checkpoints x 2 modes: 2 consolidations (was 4: one per checkpoint x benchmark x mode), 4 child runs
    in the training run's store, tagged with its run id and their step; one task per checkpoint."""
    from ilvr.evaluation.cli import main as eval_main

    run = training_run
    sweep = str(tmp_path / "sweep")
    assert eval_main(["sweep", "run", "--out", sweep, "--checkpoint-glob", str(run["dir"] / "checkpoints" / "step-*"),
                      "--benchmark", f"vsp={eval_shards}", "--modes", "latent", "text", "--max-new-tokens", "4",
                      "--limit", "2"]) == 0
    assert sorted(run["consolidated"]) == ["step-10", "step-5"]
    plan = json.load(open(os.path.join(sweep, "sweep.json")))
    assert plan["tracking_uri"] == run["uri"] and len(plan["tasks"]) == 2
    summary = open(os.path.join(sweep, "summary.csv")).read().splitlines()
    assert [line.split(",")[2:5] + line.split(",")[-1:] for line in summary[1:]] == [
        ["5", "vsp", "latent", "ok"], ["5", "vsp", "text", "ok"], ["10", "vsp", "latent", "ok"],
        ["10", "vsp", "text", "ok"]]
    runs = _eval_runs(run["uri"])
    assert sorted((r.data.tags["ilvr.checkpoint_step"], r.data.params["mode"]) for r in runs) == \
        [("10", "latent"), ("10", "text"), ("5", "latent"), ("5", "text")]
    assert {r.data.tags["ilvr.train_run_id"] for r in runs} == {run["run_id"]}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {plan["parent_run_id"]}

    capsys.readouterr()
    assert eval_main(["sweep", "task", "--sweep", sweep, "--index", "1"]) == 0  # a rerun: one checkpoint, once
    assert run["consolidated"].count("step-10") == 2 and len(run["consolidated"]) == 3


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=train_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_trained_model_export_eval_sweep_report(tmp_path, two_stage_run, monkeypatch):
    """The quick-start path: train on 2 ZeRO-3 ranks -> export -> ilvr-eval x 3 modes -> sweep -> ilvr-report,
    all in the training run's one MLflow store; the sweep consolidates each checkpoint once. (The training run
    is conftest's two_stage_run, shared with tests/test_param_groups.py: 4 steps, checkpoints at 2 and 4.)"""
    import mlflow

    import ilvr.export
    from ilvr.evaluation.cli import main as eval_main
    from ilvr.evaluation.report import main as report_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = write_vsp_shards(str(tmp_path / "eval_shards"), 4, seed=6)
    run = two_stage_run["dir"]
    export = str(tmp_path / "export")
    _cli("-m", "ilvr.export", "--checkpoint", run, "--out", export)
    train_run_id = json.load(open(os.path.join(run, "checkpoints", "step-4", "trainer.json")))["mlflow_run_id"]
    record = json.load(open(os.path.join(export, "ilvr_settings.json")))["mlflow"]
    assert record["run_id"] == train_run_id
    assert record["tracking_db"] == os.path.relpath(os.path.join(run, "mlflow.db"), export)

    uri = f"sqlite:///{run}/mlflow.db"  # the training run's store: every evaluation below lands there
    for mode in ("latent", "text", "constant-latent"):
        out = _cli("-m", "ilvr.evaluate", "--model", export, "--shards", shards, "--out", str(tmp_path / mode),
                   "--mode", mode, "--max-new-tokens", "16", "--batch-size", "4").stdout
        metrics = json.loads(out.strip().splitlines()[-1])
        assert metrics["num_samples"] == 4 and 0.0 <= metrics["success_rate"] <= 1.0

    consolidations = []
    real = ilvr.export.consolidated_state_dict
    monkeypatch.setattr(ilvr.export, "consolidated_state_dict",
                        lambda checkpoint: consolidations.append(checkpoint) or real(checkpoint))
    sweep = str(tmp_path / "sweep")
    assert eval_main(["sweep", "run", "--out", sweep, "--checkpoint-glob", os.path.join(run, "checkpoints", "step-*"),
                      "--benchmark", f"vsp={shards}", "--modes", "latent", "text", "--max-new-tokens", "8"]) == 0
    assert sorted(os.path.basename(c) for c in consolidations) == ["step-2", "step-4"]  # not 4: once per checkpoint
    summary = open(os.path.join(sweep, "summary.md"), encoding="utf-8").read()
    assert "step-2" in summary and "step-4" in summary and summary.count("| ok |") == 4
    plan = json.load(open(os.path.join(sweep, "sweep.json")))
    assert plan["tracking_uri"] == uri
    client = mlflow.tracking.MlflowClient(uri)
    assert client.get_run(plan["parent_run_id"]).info.status == "FINISHED"
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.mlflow.parentRunId = '{plan['parent_run_id']}'")
    assert sorted(int(r.data.params["checkpoint_step"]) for r in children) == [2, 2, 4, 4]
    evals = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.`ilvr.train_run_id` = '{train_run_id}'")
    assert len([r for r in evals if r.data.tags.get("ilvr.kind") == "eval"]) == 7  # 3 export + 4 sweep

    report = tmp_path / "report.html"
    assert report_main(["--run", run, "--out", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    assert all(mode in html for mode in ("latent", "text", "constant-latent"))
    for section in ("Training", "Accuracy by checkpoint", "Exported model", "Sample predictions", "Config"):
        assert f"<h2>{section}</h2>" in html
    assert html.count('<img src="data:image/png;base64,') == 3  # training curves, accuracy, per category


def _no_model_loading(monkeypatch) -> None:
    import ilvr.evaluation.evaluate as evaluate
    import ilvr.evaluation.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate, "load_eval_model", refuse)
    monkeypatch.setattr(loading, "load_eval_model", refuse)


def test_bad_data_fails_before_decoding_and_nothing_evaluable_is_an_error(tmp_path, exported, eval_shards,
                                                                          monkeypatch):
    with monkeypatch.context() as m:
        _no_model_loading(m)
        with pytest.raises(ValueError, match="cannot be scored as 'comt'"):  # VSP records, wrong scorer
            run_evaluation(EvalRequest(model=exported, shards=eval_shards, out_dir=str(tmp_path / "x"),
                                       benchmark="comt", mlflow=False))
        with pytest.raises(FileNotFoundError, match="neither an exported model"):  # checked before the shards
            run_evaluation(EvalRequest(model=str(tmp_path / "no-model"), shards=str(tmp_path / "no-shards"),
                                       out_dir=str(tmp_path / "x"), mlflow=False))
    writer = ShardWriter(str(tmp_path / "broken"), prefix="b", samples_per_shard=4)
    for i, rec in enumerate(synthetic(num_samples=2, seed=3, min_size=3, max_size=3)):
        sample = record_to_sample(rec, i)  # the writer checks images now: break the image in the sample itself
        sample["in0.png"] = b"\x89PNG\r\n\x1a\n but truncated"
        writer.write(sample)
    writer.close()
    req = EvalRequest(model=exported, shards=str(tmp_path / "broken"), out_dir=str(tmp_path / "y"), mlflow=False)
    with pytest.raises(ValueError, match=r"no record .* could be evaluated \(skipped: \{'corrupt_image': 2\}"):
        run_evaluation(req)
    assert not os.path.exists(tmp_path / "y" / "metrics.json")


def test_a_sweep_dir_is_not_reused(tmp_path, exported, eval_shards, capsys):
    from ilvr.evaluation.cli import main as eval_main

    args = ["sweep", "plan", "--out", str(tmp_path / "s"), "--checkpoints", exported,
            "--benchmark", f"vsp={eval_shards}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert eval_main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "1"
    assert eval_main(args) == 2
    assert "already holds a sweep" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing-shards", "missing-model"])
def test_cli_checks_inputs_before_loading_the_model(tmp_path, exported, monkeypatch, capsys, case):
    from ilvr.evaluation.cli import main as eval_main

    _no_model_loading(monkeypatch)
    model = exported if case == "missing-shards" else str(tmp_path / "no-model")
    shards = str(tmp_path / "no-shards" / "x-{000000..000001}.tar")
    assert eval_main(["--model", model, "--shards", shards, "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert ("no-shards" in err) if case == "missing-shards" else ("neither an exported model" in err), err
    assert not (tmp_path / "o").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_decoding_shows_progress_on_a_terminal_and_logs_it_elsewhere(exported, eval_shards, monkeypatch, caplog):
    from ilvr.evaluation.data import load_records
    from ilvr.evaluation.evaluate import decode_records

    em = load_eval_model(exported, dtype="fp32")
    records = load_records(eval_shards).records
    settings = DecodeSettings(max_new_tokens=2, batch_size=4)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    decode_records(em, records, settings, progress=True)
    assert "6/6" in terminal.getvalue() and "sample" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    decode_records(em, records, settings, progress=False)  # --no-progress, or a rank other than 0
    assert quiet.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal (a Slurm log): log lines instead
    with caplog.at_level("INFO", logger="ilvr.evaluation.evaluate"):
        decode_records(em, records, settings, progress=True)
    assert any("decoded 6/6 samples" in r.getMessage() and "eta" in r.getMessage() for r in caplog.records)


def test_a_recipes_held_out_shards_are_the_default_when_eval_shards_is_empty(tmp_path):
    """data.eval_shards is read: `ilvr-eval run --config` evaluates the recipe's held-out split by default."""
    from ilvr.evaluation.cli import build_parser, fill_defaults
    from tests.conftest import REPO

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  eval_shards: {tmp_path}/held-out\neval:\n  shards: ''\n")
    config = [str(REPO / "configs" / "tiny_cpu.yaml"), str(recipe)]
    args = build_parser().parse_args(["run", "--model", "m", "--out", "o"] + sum((["--config", c] for c in config), []))
    fill_defaults(args)
    assert args.shards == f"{tmp_path}/held-out"
    args = build_parser().parse_args(["run", "--model", "m", "--out", "o", "--shards", "given", "--config", config[0]])
    fill_defaults(args)
    assert args.shards == "given"


def test_a_second_evaluation_into_the_same_out_is_refused_naming_the_holder(tmp_path, exported, eval_shards,
                                                                             monkeypatch, capsys):
    from ilvr.evaluation.cli import main as eval_main
    from ilvr.training.run_lock import OutputDirBusy

    out = str(tmp_path / "eval")
    code = ("import sys, time; from ilvr.training.run_lock import lock_output_dir; "
            "lock_output_dir(sys.argv[1], 'ilvr-eval --out'); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "locked"  # the first evaluation, still running
        (tmp_path / "eval" / "metrics.json").write_text("{\"first\": true}")
        _no_model_loading(monkeypatch)  # refused before the model loads
        with pytest.raises(OutputDirBusy, match=rf"ilvr-eval --out='{out}' is in use by another job \(pid {holder.pid}"):
            run_evaluation(EvalRequest(model=exported, shards=eval_shards, out_dir=out, mlflow=False))
        assert eval_main(["--model", exported, "--shards", eval_shards, "--out", out, "--no-mlflow"]) == 3
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == {"first": True}  # untouched
    finally:
        holder.kill()
        holder.wait()
