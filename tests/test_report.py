"""ilvr-report: a real SQLite MLflow store with eval runs -> HTML + Markdown; the SVG chart on its own."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from ilvr.evaluation import report
from ilvr.evaluation.report import EvalRow, ReportMeta, main, render_html, render_markdown, svg_line_chart

# (benchmark, mode, step) -> accuracy of the run that must win
ACC = {
    ("vsp", "latent", 100): 0.40, ("vsp", "latent", 200): 0.625,
    ("vsp", "text", 100): 0.30, ("vsp", "text", 200): 0.50,
    ("vsp", "constant-latent", 100): 0.35, ("vsp", "constant-latent", 200): 0.45,
    ("comt", "latent", 100): 0.20, ("comt", "latent", 200): 0.75,
    ("comt", "text", 100): 0.25, ("comt", "text", 200): 0.70,
    ("comt", "constant-latent", 100): 0.10, ("comt", "constant-latent", 200): 0.125,
}
ODD_MODEL = "exports/<final>&co"  # a step-less exported model; its name must come out escaped


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _log(client, exp, start, params, metrics, step, parent=None, kind="eval", status="FINISHED"):
    from mlflow.entities import Metric, Param

    tags = {"ilvr.kind": kind}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, start_time=start, tags=tags,
                               run_name=f"{params.get('benchmark', 'sweep')}-{params.get('mode', '')}").info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), start, step) for k, v in metrics.items()])
    client.set_terminated(run_id, status=status)
    return run_id


def _eval(client, exp, parent, start, bench, mode, step, acc, model=None, status="FINISHED"):
    cats = ({f"level{i}": acc for i in range(3, 9)} if bench == "vsp"
            else {"spatial_relations": acc / 2, "counting": 1.0})
    metrics = {"accuracy": acc, "num_samples": 60, "unparseable": 3, "unparseable_rate": 0.05,
               "latency_ms_mean": 120.0 + (step or 0), "latency_ms_p50": 110.0, "latency_ms_p90": 180.0,
               "tokens_per_s": 42.5, "latent_segments_mean": 1.5, "wall_s": 9.0}
    for cat, value in cats.items():
        metrics[f"accuracy/{cat}"], metrics[f"count/{cat}"] = value, 10
    if bench == "vsp":
        metrics["success_rate"] = acc
    params = {"model": model or f"runs/a/checkpoint-{step}", "checkpoint_step": "" if step is None else step,
              "benchmark": bench, "mode": mode, "max_new_tokens": 64, "batch_size": 4, "do_sample": False,
              "num_samples": 60}
    return _log(client, exp, start, params, metrics, step or 0, parent=parent, status=status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Parent sweep A (the grid, one older duplicate, one FAILED run, one step-less model), parent B (zebra)."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ilvr-eval")
    t = 1_700_000_000_000
    parent = _log(client, exp, t, {}, {}, 0, kind="eval-sweep")
    _eval(client, exp, parent, t + 1, "vsp", "latent", 200, 0.111)  # older duplicate: dropped
    for i, ((bench, mode, step), acc) in enumerate(ACC.items()):
        _eval(client, exp, parent, t + 10 + i, bench, mode, step, acc)
    _eval(client, exp, parent, t + 100, "vsp", "text", 200, 0.99, status="FAILED")  # newest, but failed
    _eval(client, exp, parent, t + 101, "comt", "latent", None, 0.875, model=ODD_MODEL)
    other = _log(client, exp, t + 200, {}, {}, 0, kind="eval-sweep")
    _eval(client, exp, other, t + 201, "zebra", "text", 300, 0.55)
    sweep = tmp / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
    return {"uri": uri, "tmp": tmp, "parent": parent, "other": other, "sweep": sweep}


def _table_row(html_text: str, label: str) -> list:
    """Cells of every HTML table row whose first cell is `label`."""
    rows = re.findall(rf'<tr><th scope="row">{re.escape(label)}</th>(.*?)</tr>', html_text)
    return [re.findall(r"<td>(.*?)</td>", r) for r in rows]


def test_report_from_sweep(store, capsys):
    out = store["tmp"] / "out" / "report.html"
    assert main(["--sweep", str(store["sweep"]), "--out", str(out)]) == 0  # tracking URI from sweep.json
    html_path, md_path = out, out.with_suffix(".md")
    assert capsys.readouterr().out.split() == [str(html_path), str(md_path)]
    page, md = html_path.read_text(), md_path.read_text()

    assert page.count("<svg") == 2 and "zebra" not in page  # one chart per benchmark; other parent left out
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for mode in ("latent", "text", "constant-latent"):
        assert f'<th scope="col">{mode}</th>' in page
    assert "Runs</dt><dd>13<" in page and "1 duplicate run(s) dropped" in page
    assert "11.1%" not in page and "99.0%" not in page  # the duplicate and the FAILED run
    # accuracy tables: first the per-step table (step, modes), then the mode comparison with deltas
    vsp_200, comt_100 = _table_row(page, "200"), _table_row(page, "100")
    assert vsp_200[0] == ["62.5%", "50.0%", "45.0%"]
    assert comt_100[1] == ["20.0%", "25.0%", "10.0%"]
    assert ["62.5%", "50.0%", "45.0%", "+12.5 pp", "+17.5 pp"] in vsp_200
    assert ["20.0%", "25.0%", "10.0%", "-5.0 pp", "+10.0 pp"] in comt_100
    # the step-less model: in the tables, escaped, not plotted
    assert "exports/&lt;final&gt;&amp;co (step unknown)" in page and ODD_MODEL not in page
    assert _table_row(page, "exports/&lt;final&gt;&amp;co (step unknown)")[0] == ["87.5%", "-", "-"]
    assert "87.5%" not in page.split("<svg")[2].split("</svg>")[0]
    # categories at the latest step and the latency table
    assert _table_row(page, "spatial_relations")[0] == ["37.5% (n=10)", "35.0% (n=10)", "6.2% (n=10)"]
    assert _table_row(page, "level8")[0] == ["62.5% (n=10)", "50.0% (n=10)", "45.0% (n=10)"]
    assert _table_row(page, "vsp")[0][:8] == ["latent", "200", "320.0", "110.0", "180.0", "42.5", "1.50", "5.0%"]

    assert "| 200 | 62.5% | 50.0% | 45.0% |" in md
    assert "| 100 | 20.0% | 25.0% | 10.0% | -5.0 pp | +10.0 pp |" in md
    assert "| exports/\\<final\\>&co (step unknown) | 87.5% | - | - |" in md  # not read as HTML
    assert "| level8 | 62.5% (n=10) | 50.0% (n=10) | 45.0% (n=10) |" in md
    assert "<svg" not in md


def test_parent_filter_and_all_runs(store, monkeypatch, capsys):
    out = store["tmp"] / "other.md"
    assert main(["--tracking-uri", store["uri"], "--parent-run-id", store["other"], "--out", str(out)]) == 0
    page = out.with_suffix(".html").read_text()
    assert page.count("<svg") == 1 and "zebra" in page and "vsp" not in page and "Runs</dt><dd>1<" in page
    assert "| 300 | 55.0% |" in out.read_text()

    everything = store["tmp"] / "all.html"
    monkeypatch.setattr(report, "PAGE_SIZE", 4)  # 15 finished eval runs: four pages
    assert main(["--tracking-uri", store["uri"], "--experiment", "ilvr-eval", "--out", str(everything)]) == 0
    page = everything.read_text()
    assert page.count("<svg") == 3 and "Runs</dt><dd>14<" in page and "1 duplicate run(s) dropped" in page


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
    with pytest.raises(SystemExit) as e:  # no store at all: the error names the flag
        main(["--out", out])
    assert e.value.code == 2 and "--tracking-uri" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_render_escapes_and_redacts():
    rows = [EvalRow("r1", "comt", "latent", 5, "m", {"accuracy": 0.5, "accuracy/a<b&c": 0.25, "count/a<b&c": 4}),
            EvalRow("r2", "comt", "text", 5, "m", {"accuracy": 0.4})]
    meta = ReportMeta(store="https://alice:hunter2@mlflow.example/", filter="<all>")
    page, md = render_html(rows, meta), render_markdown(rows, meta)
    assert "a&lt;b&amp;c" in page and "a<b" not in page and "&lt;all&gt;" in page
    assert "hunter2" not in page and "hunter2" not in md and "https://***@mlflow.example/" in md
    assert "| a\\<b&c | 25.0% (n=4) | - |" in md
    assert "| 5 | 50.0% | 40.0% | - | +10.0 pp | - |" in md


def test_svg_line_chart_is_valid_xml():
    svg = svg_line_chart({"latent": [(100, 0.4), (200, 0.625)], "a<b": [(200, 0.5)]}, "vsp & co: accuracy",
                         y_range=(0.0, 1.0), y_format=lambda v: f"{100 * v:g}%", chart_id="c1")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg" and root.get("role") == "img"
    assert root.find(ns + "title").text == "vsp & co: accuracy"
    assert len(root.findall(ns + "polyline")) == 1 and len(root.findall(ns + "circle")) == 3
    texts = [t.text for t in root.iter(ns + "text")]
    assert {"latent", "a<b", "0%", "100%", "200"} <= set(texts)
    ET.fromstring(svg_line_chart({}, "empty"))  # no data still draws valid axes
    ET.fromstring(svg_line_chart({"one": [(7, 3.0)]}, "one point"))
