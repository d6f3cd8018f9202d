"""ilvr-report: a real SQLite MLflow store with a training run and its eval runs -> HTML + Markdown.

What the rendered report showed in headless Chromium (and what these tests hold it to): the sections in
order, one PNG per figure (training curves; per benchmark accuracy vs step and a per-category heatmap),
accuracy cells with 95% Wilson intervals, the exported model's table, sample predictions with [latent]
chips beside the gold answer, the config, links to the MLflow UI, nothing loaded from outside the file.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil

import pytest

from ilvr.evaluation import report, report_data
from ilvr.evaluation.report import main, render_html, render_markdown
from ilvr.evaluation.report_data import EvalRow, ReportData, ReportMeta, TrainingRun, stage_switch, wilson

N = 40
# (benchmark, mode, step) -> accuracy of the run that must win (multiples of 1/N)
ACC = {
    ("vsp", "latent", 100): 0.40, ("vsp", "latent", 200): 0.625,
    ("vsp", "text", 100): 0.30, ("vsp", "text", 200): 0.50,
    ("vsp", "constant-latent", 100): 0.35, ("vsp", "constant-latent", 200): 0.45,
    ("comt", "latent", 100): 0.20, ("comt", "latent", 200): 0.75,
    ("comt", "text", 100): 0.25, ("comt", "text", 200): 0.70,
    ("comt", "constant-latent", 100): 0.10, ("comt", "constant-latent", 200): 0.125,
}
ODD_MODEL = "exports/<final>&co"  # an exported model; its name must come out escaped
SECTIONS = ["Training", "Accuracy by checkpoint", "Exported model", "Accuracy per category", "Mode comparison",
            "Sample predictions", "Latency and output health", "Config", "MLflow runs"]
TRAIN_KEYS = ("loss", "ce", "align", "latent/align_cos", "latent/align_first", "latent/align_later",
              "latent/align_copy", "latent/selected_mean", "lr", "grad_norm", "samples_per_s")


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write_shards(out: str, n: int = 3) -> str:
    from data_pipeline.records import record_to_sample
    from data_pipeline.shards import ShardWriter
    from data_pipeline.sources.synthetic_vsp import read as synthetic

    writer = ShardWriter(out, prefix="eval", samples_per_shard=4)
    for i, rec in enumerate(synthetic(num_samples=n, seed=3, min_size=3, max_size=4)):
        writer.write(record_to_sample(rec, i))
    writer.close()
    return out


def _log(client, exp, start, params, metrics, step, tags=None, status="FINISHED", artifacts=None, tmp=None):
    from mlflow.entities import Metric, Param

    run_id = client.create_run(exp, start_time=start, tags=dict(tags or {}),
                               run_name=f"{params.get('benchmark', 'run')}-{params.get('mode', '')}").info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), start, step) for k, v in metrics.items()])
    for name, rows in (artifacts or {}).items():
        path = tmp / run_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)
    return run_id


def _predictions(mode: str, gold: bool) -> list:
    """Three predictions; latent mode opens latent segments. Without `gold`: rows written before the field."""
    rows = []
    for i in range(4):
        text = ("Step 1: <latent> then <latent> R" if mode == "latent" else f"Move R <b>{mode}</b>") + \
               f" \\boxed{{R,D}}{i}"
        row = {"id": f"synvsp-s3-{i:06d}", "prompt": "Find the plan <image>", "prediction": text,
               "parsed": "R,D", "correct": i == 0, "category": "level3"}
        if gold:
            row["gold"] = "R,D"
        rows.append(row)
    return rows


def _eval(client, exp, start, bench, mode, step, acc, tmp, parent=None, train=None, model=None, status="FINISHED",
          kind="checkpoint", predictions=None, shards=""):
    cats = ({f"level{i}": acc for i in range(3, 9)} if bench == "vsp"
            else {"spatial_relations": acc / 2, "counting": 1.0})
    metrics = {"accuracy": acc, "num_samples": N, "num_correct": round(acc * N), "unparseable": 3,
               "unparseable_rate": 0.05, "latency_ms_mean": 120.0 + (step or 0), "latency_ms_p50": 110.0,
               "latency_ms_p90": 180.0, "tokens_per_s": 42.5, "latent_segments_mean": 1.5, "wall_s": 9.0}
    for cat, value in cats.items():
        metrics[f"accuracy/{cat}"], metrics[f"count/{cat}"] = value, 2 * N
    params = {"model": model or f"runs/a/checkpoints/step-{step}", "checkpoint_step": "" if step is None else step,
              "benchmark": bench, "mode": mode, "max_new_tokens": 64, "batch_size": 4, "num_samples": N,
              "shards": shards}
    tags = {"ilvr.kind": "eval", "ilvr.model_kind": kind}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if train:
        tags["ilvr.train_run_id"] = train
    arts = {"predictions.jsonl": predictions} if predictions else None
    return _log(client, exp, start, params, metrics, step or 0, tags, status, arts, tmp)


def _training(client, exp, start):
    """A 4-step training run: stage 1 at steps 1-2, stage 2 at 3-4 (the `stage` metric says so)."""
    from mlflow.entities import Metric, Param

    run_id = client.create_run(exp, start_time=start, run_name="train").info.run_id
    metrics = [Metric(k, 1.0 / s, start, s) for s in range(1, 5) for k in TRAIN_KEYS]
    metrics += [Metric("stage", 1.0 if s <= 2 else 2.0, start, s) for s in range(1, 5)]
    params = {"model.latent_size": 4, "train.stage": "1+2", "train.stage1_steps": 2, "train.lr": 0.001,
              "data.batch_size": 2}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A training run; sweep A (the grid, an older duplicate, a FAILED run, predictions for the latest step
    written before rows had `gold`); an exported model's eval; sweep B (zebra)."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("report")
    shards = write_shards(str(tmp / "shards"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ilvr", artifact_location=(tmp / "mlartifacts").as_uri())
    t = 1_700_000_000_000
    train = _training(client, exp, t)
    parent = _log(client, exp, t, {}, {}, 0, tags={"ilvr.kind": "eval-sweep"})
    kw = dict(tmp=tmp, parent=parent, train=train)
    _eval(client, exp, t + 1, "vsp", "latent", 200, 0.111, **kw)  # older duplicate: dropped
    for i, ((bench, mode, step), acc) in enumerate(ACC.items()):
        preds = _predictions(mode, gold=False) if (bench, step) == ("vsp", 200) else None  # gold: from the shards
        _eval(client, exp, t + 10 + i, bench, mode, step, acc, predictions=preds, shards=shards, **kw)
    _eval(client, exp, t + 100, "vsp", "text", 200, 0.99, status="FAILED", **kw)  # newest, but failed
    _eval(client, exp, t + 101, "comt", "latent", 200, 0.875, model=ODD_MODEL, kind="exported", **kw)
    other = _log(client, exp, t + 200, {}, {}, 0, tags={"ilvr.kind": "eval-sweep"})
    _eval(client, exp, t + 201, "zebra", "text", 300, 0.55, tmp=tmp, parent=other)
    sweep = tmp / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
    return {"uri": uri, "tmp": tmp, "parent": parent, "other": other, "sweep": sweep, "train": train, "exp": exp}


def _table_row(html_text: str, label: str) -> list:
    """Cells of every HTML table row whose first cell is `label`."""
    rows = re.findall(rf'<tr><th scope="row">{re.escape(label)}</th>(.*?)</tr>', html_text)
    return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]


def _pngs(page: str) -> list:
    """The embedded figures, opened: every <img> must be a PNG data URI."""
    from PIL import Image

    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in srcs]


def assert_self_contained(page: str, ui: str = report.MLFLOW_UI) -> None:
    """Opens offline: no scripts, no stylesheets or images from elsewhere; links only to the MLflow UI."""
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith(ui + "/#/experiments/") for h in hrefs), hrefs


def test_report_from_sweep(store, capsys):
    out = store["tmp"] / "out" / "report.html"
    assert main(["--sweep", str(store["sweep"]), "--out", str(out)]) == 0  # tracking URI from sweep.json
    html_path, md_path = out, out.with_suffix(".md")
    assert capsys.readouterr().out.split() == [str(html_path), str(md_path)]
    page, md = html_path.read_text(), md_path.read_text()

    assert re.findall(r"<h2>(.*?)</h2>", page) == SECTIONS
    figures = _pngs(page)  # training curves; vsp and comt: accuracy vs step, per-category heatmap
    assert len(figures) == 5 and all(f.width > 500 and f.height > 200 for f in figures)
    assert_self_contained(page)
    assert "zebra" not in page  # another sweep's run
    for mode in ("latent", "text", "constant-latent"):
        assert f'<th scope="col">{mode}</th>' in page
    assert "Evaluation runs</dt><dd>13<" in page and "1 duplicate run(s) dropped" in page
    assert "11.1%" not in page and "99.0%" not in page  # the duplicate and the FAILED run
    # accuracy with 95% Wilson intervals (n = 40): the per-step table, then the mode comparison with deltas
    vsp_200, comt_100 = _table_row(page, "200"), _table_row(page, "100")
    assert vsp_200[0] == ["40", "62.5% [47.0-75.8]", "50.0% [35.2-64.8]", "45.0% [30.7-60.2]"]
    assert comt_100[1] == ["40", "20.0% [10.5-34.8]", "25.0% [14.2-40.2]", "10.0% [4.0-23.1]"]
    assert ["62.5%", "50.0%", "45.0%", "-", "+12.5 pp", "+17.5 pp", "-"] in vsp_200  # no shuffled-latent run
    assert ["20.0%", "25.0%", "10.0%", "-", "-5.0 pp", "+10.0 pp", "-"] in comt_100
    # the exported model: its own table, escaped, a star in the figure, a link to its run
    exported = _table_row(page, "comt")[0]
    assert exported[:6] == ["latent", "200", "87.5% [73.9-94.5]", "-", "40", "5.0%"]  # "-": no chance metric logged
    assert exported[6] == "exports/&lt;final&gt;&amp;co" and ODD_MODEL not in page
    assert exported[7].startswith(f'<a href="{report.MLFLOW_UI}/#/experiments/{store["exp"]}/runs/')
    # categories at the latest step: accuracy, interval and n per cell
    assert _table_row(page, "spatial_relations")[0] == ["37.5% [27.7-48.5] n=80", "35.0% [25.5-45.9] n=80",
                                                         "6.2% [2.7-13.8] n=80"]
    assert _table_row(page, "level8")[0] == ["62.5% [51.5-72.3] n=80", "50.0% [39.3-60.7] n=80",
                                              "45.0% [34.6-55.9] n=80"]
    assert _table_row(page, "vsp")[0][:8] == ["latent", "200", "320.0", "110.0", "180.0", "42.5", "1.50", "5.0%"]
    # sample predictions: the same records in every mode, latent segments marked, gold beside them
    samples = re.findall(r'<div class="sample">(.*?)</div>', page, re.S)
    assert len(samples) == report.SAMPLES_PER_MODE
    golds = ["L,D,L", "R", "R"]  # the records' plans, read from the shards (the rows have no gold field)
    assert [re.search(r"gold answer: <code>(.*?)</code>", s).group(1) for s in samples] == golds
    assert all(s.count('<span class="latent">[latent]</span>') == 2 for s in samples)  # only the latent mode's
    assert "Move R &lt;b&gt;text&lt;/b&gt;" in samples[0] and "<b>text" not in page
    # config and the training run
    assert _table_row(page, "train.stage1_steps")[0] == ["2"] * 1 and "All 5 parameters" in page
    assert f'/runs/{store["train"]}">{store["train"]}</a>' in page

    assert "| 200 | 40 | 62.5% [47.0-75.8] | 50.0% [35.2-64.8] | 45.0% [30.7-60.2] |" in md
    assert "| 100 | 20.0% | 25.0% | 10.0% | - | -5.0 pp | +10.0 pp | - |" in md
    assert "exports/\\<final\\>&co" in md  # not read as HTML
    assert "<img" not in md and "data:image" not in md


def test_training_curves_and_stage_switch(store):
    rows = [EvalRow("r1", "vsp", "latent", 2, "m", {"accuracy": 0.5, "num_samples": 32})]
    curves = {"loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "stage": [(1, 1.0), (2, 1.0), (3, 2.0)]}
    assert stage_switch(curves, {}) == 2.5
    assert stage_switch({"loss": curves["loss"]}, {"train.stage": "1+2", "train.stage1_steps": "20"}) == 20.5
    assert stage_switch({"loss": curves["loss"]}, {"train.stage": "2"}) is None
    page = render_html(ReportData(rows, ReportMeta(store="sqlite:///x.db"), TrainingRun("t1", curves, source="x")))
    assert "after step 2" in page and len(_pngs(page)) == 2  # training curves, accuracy (no categories)
    page = render_html(ReportData(rows, ReportMeta(store="sqlite:///x.db")))
    assert "No training run found" in page and len(_pngs(page)) == 1


def test_wilson_interval():
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)  # 0/32: up to 10.7%
    assert wilson(16, 32) == pytest.approx((0.3364, 0.6636), abs=1e-4)  # n = 32 at 50%: about +-16 points
    assert wilson(32, 32)[1] == 1.0 and wilson(32, 32)[0] == pytest.approx(0.8928, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_report_of_a_moved_training_run(store, tmp_path, capsys):
    """--run RUN_DIR: the run's store (from mlflow_run.json), every evaluation tagged with its id, curves from its
    metrics.jsonl; after moving the whole directory, predictions artifacts are still found beside the db."""
    from mlflow.tracking import MlflowClient

    from ilvr.config import load_config
    from ilvr.training.tracking import Tracker

    run = tmp_path / "exp" / "train"
    tracker = Tracker(rank=0)
    train = tracker.start(load_config(None, [f"train.output_dir={run}", "train.stage1_steps=2"], check_paths=False))
    tracker.end("FINISHED")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "ce": 2.0 / s, "align": 0.5,
                                                            "latent/selected_mean": 2.0, "stage": 1 + (s > 2)}) + "\n"
                                               for s in range(1, 6)))
    uri = f"sqlite:///{run}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(train).info.experiment_id
    for i, mode in enumerate(("latent", "text")):
        _eval(client, exp, 10 + i, "vsp", mode, 4, 0.0, tmp=tmp_path, train=train,
              predictions=_predictions(mode, gold=True))
    _eval(client, exp, 20, "vsp", "latent", 4, 0.5, tmp=tmp_path)  # another run's evaluation: left out

    shutil.move(str(tmp_path / "exp"), str(tmp_path / "moved"))
    moved = tmp_path / "moved" / "train"
    out = tmp_path / "report.html"
    assert main(["--run", str(moved), "--out", str(out), "--mlflow-ui", "http://mlflow.lan:8080"]) == 0
    page = out.read_text()
    assert f"Store</dt><dd>sqlite:///{moved}/mlflow.db<" in page and "Evaluation runs</dt><dd>2<" in page
    assert f"Curves read from {moved}/metrics.jsonl" in page and "after step 2" in page
    assert len(re.findall(r'<div class="sample">', page)) == 3 and '<span class="latent">' in page
    assert "0.0% [0.0-8.8]" in page  # 0 of 40
    assert_self_contained(page, ui="http://mlflow.lan:8080")
    assert not (tmp_path / "exp").exists()


def test_gold_comes_from_the_benchmark_data_when_predictions_lack_it(store):
    rows = [{"id": "synvsp-s3-000000", "prediction": "\\boxed{R}"}, {"id": "not-in-data", "prediction": ""},
            {"id": "synvsp-s3-000001", "prediction": "", "gold": "kept"}]
    report_data.fill_gold(rows, str(store["tmp"] / "shards"), "vsp", {})
    assert rows[0]["gold"] == "L,D,L" and "gold" not in rows[1] and rows[2]["gold"] == "kept"
    report_data.fill_gold(rows[1:], str(store["tmp"] / "no-such-shards"), "vsp", {})  # data gone: left without
    assert "gold" not in rows[1]


def test_parent_filter_and_all_runs(store, monkeypatch, capsys):
    out = store["tmp"] / "other.md"
    assert main(["--tracking-uri", store["uri"], "--parent-run-id", store["other"], "--out", str(out)]) == 0
    page = out.with_suffix(".html").read_text()
    assert "zebra" in page and "vsp" not in page and "Evaluation runs</dt><dd>1<" in page
    assert len(_pngs(page)) == 2 and "No training run found" in page  # accuracy, categories
    assert "| 300 | 40 | 55.0% [39.8-69.3] |" in out.read_text()

    everything = store["tmp"] / "all.html"
    monkeypatch.setattr(report_data, "PAGE_SIZE", 4)  # 15 finished eval runs: four pages
    assert main(["--tracking-uri", store["uri"], "--experiment", "ilvr", "--out", str(everything)]) == 0
    page = everything.read_text()
    assert "Evaluation runs</dt><dd>14<" in page and "1 duplicate run(s) dropped" in page and "zebra" in page


def test_nothing_to_report(store, tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert main(["--tracking-uri", store["uri"], "--parent-run-id", "0" * 32, "--out", out]) == 2
    assert "no finished eval runs" in capsys.readouterr().err
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/missing.db", "--out", out]) == 2
    assert main(["--tracking-uri", store["uri"], "--experiment", "nope", "--out", out]) == 2
    bad_sweep = tmp_path / "sweep"
    bad_sweep.mkdir()
    (bad_sweep / "sweep.json").write_text(json.dumps({"parent_run_id": None, "tracking_uri": store["uri"]}))
    with pytest.raises(SystemExit):  # no parent in sweep.json: refused rather than reporting every run
        main(["--sweep", str(bad_sweep), "--out", out])
    with pytest.raises(SystemExit):  # not a run dir: the error names the flag
        main(["--run", str(tmp_path), "--out", out])
    assert "--run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no store at all: the error names the flag
        main(["--out", out])
    assert e.value.code == 2 and "--tracking-uri" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_render_escapes_and_redacts():
    rows = [EvalRow("r1", "comt", "latent", 5, "m", {"accuracy": 0.5, "accuracy/a<b&c": 0.25, "count/a<b&c": 4}),
            EvalRow("r2", "comt", "text", 5, "m", {"accuracy": 0.4})]
    meta = ReportMeta(store="https://alice:hunter2@mlflow.example/", filter="<all>")
    data = ReportData(rows, meta, predictions={"r1": [{"id": "x<y", "prediction": "<latent><script>", "gold": "<B>"}]})
    page, md = render_html(data), render_markdown(data)
    assert "a&lt;b&amp;c" in page and "a<b" not in page and "&lt;all&gt;" in page
    assert "<script" not in page and '<span class="latent">[latent]</span>&lt;script&gt;' in page
    assert "gold answer: <code>&lt;B&gt;</code>" in page and "x&lt;y" in page
    assert "hunter2" not in page and "hunter2" not in md and "https://***@mlflow.example/" in md
    assert "| a\\<b&c | 25.0% [4.6-69.9] n=4 | - |" in md
    assert "| 5 | 50.0% | 40.0% | - | - | +10.0 pp | - | - |" in md
