"""ilvr-report: a training run and its evaluations in an MLflow store -> one self-contained HTML report + Markdown.

    ilvr-report --run runs/x/train --out report.html          # everything evaluated from that training run
    ilvr-report --sweep runs/x/sweep --out report.html        # one sweep
    ilvr-report --tracking-uri URI [--experiment NAME] [--parent-run-id ID] --out report.html

Gathering (report_data.py: collect_*, the only part that talks to MLflow or reads files) is kept apart from
rendering (here: render_markdown / render_html, a ReportData in, text out), so a report can be tested and
re-rendered without a store. Both formats are built from the same blocks, so their tables agree. Accuracies
are fractions in [0, 1], shown as percents with 95% Wilson intervals: with n = 32 samples an accuracy near 50%
is only known to about +-16 points, near 0% the interval is [0, 10.7%]. Figures (report_figures.py) are
matplotlib PNGs (matplotlib comes with mlflow) embedded as data URIs: the HTML has no JavaScript and loads
nothing, so it opens offline; the only links are to the MLflow UI (`mlflow ui`, --mlflow-ui).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ilvr.evaluation.report_data import (MLFLOW_UI, SAMPLES_PER_MODE, TRAINING_PANELS, EvalRow, ReportData, ReportMeta,
                                         TrainingRun, accuracy_ci, by_benchmark, collect_predictions, collect_runs,
                                         collect_training, dedupe, grid_rows, is_number, latest_per_mode, mode_key,
                                         n_label, order_names, sample_runs, split_stepped, stage_switch)
from ilvr.evaluation.report_figures import accuracy_figure, category_figure, training_figure
from ilvr.fileio import write_text_atomic
from ilvr.model.generate import MODES  # display order; other modes follow alphabetically
from ilvr.training.mlflow_store import prepare_server, redact_uri
from ilvr.training.run_record import run_store

MAX_PREDICTION_CHARS = 700
KEY_PARAMS = ("model.name_or_path", "model.latent_size", "train.stage", "train.stage1_steps", "train.max_steps",
              "train.lr", "train.lr_schedule", "train.warmup_steps", "data.batch_size", "loss.w_align")


def pct(v) -> str:
    return f"{100 * v:.1f}%" if is_number(v) else "-"


def pct_ci(acc, n, with_n: bool = False) -> str:
    """"12.5% [4.9-28.1]": the accuracy and its 95% Wilson interval in percent."""
    ci = accuracy_ci(acc, n)
    if ci is None:
        return pct(acc)
    text = f"{100 * acc:.1f}% [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]"
    return text + (f" n={n:.0f}" if with_n else "")


def delta_pp(a, b) -> str:
    """Difference of two accuracies in percentage points, signed."""
    return f"{100 * (a - b):+.1f} pp" if is_number(a) and is_number(b) else "-"


def num(v, spec: str = ".1f") -> str:
    return format(v, spec) if is_number(v) else "-"


@dataclass
class Link:
    """A table cell that links to the MLflow UI."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


def run_link(meta: ReportMeta, experiment_id: str, run_id: str, text: "str | None" = None) -> Link:
    return Link(text or run_id[:8], f"{meta.mlflow_ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")


# ------------------------------------------------------------------------------------ report content

def _blocks(data: ReportData, figures: bool = True) -> list:
    """The report as neutral blocks: (h1|h2|h3|p, text), (kv, pairs), (table, header, rows), (img, uri, alt),
    (code, text), (samples, [...]), (details, summary, block)."""
    meta = data.meta
    kept, dropped = dedupe(data.rows)
    stepped, other = split_stepped(kept)
    out: list = [("h1", "ILVR report"), ("kv", _header(data, kept))]
    if dropped:
        out.append(("p", f"{dropped} duplicate run(s) dropped: for the same benchmark, mode, checkpoint step "
                         f"and model only the newest run counts."))
    out += _training_blocks(data, stepped, figures)
    out += _accuracy_blocks(stepped, other, figures)
    out += _exported_blocks(meta, other)
    out += _category_blocks(stepped or other, figures)
    out += _mode_blocks(stepped or other)
    out += _sample_blocks(data)
    out += _latency_blocks(kept)
    out += _config_blocks(data)
    out += _run_blocks(meta, data.training, kept)
    return out


def _header(data: ReportData, kept: list) -> list:
    meta, store = data.meta, redact_uri(data.meta.store)
    pairs = [("Store", store), ("Filter", meta.filter), ("Generated", meta.generated_at),
             ("Evaluation runs", str(len(kept)))]
    t = data.training
    if t and t.run_id:
        pairs.append(("Training run", run_link(meta, t.experiment_id, t.run_id, t.run_id) if t.experiment_id
                      else t.run_id))
    pairs.append(("Browse", f"mlflow ui --backend-store-uri {store}" + (" (then the links below)" if kept else "")))
    pairs.append(("Intervals", "95% Wilson score intervals in brackets; n = samples per run"))
    return pairs


def _training_blocks(data: ReportData, stepped: list, figures: bool) -> list:
    t = data.training
    out: list = [("h2", "Training")]
    if t is None or not t.curves:
        return out + [("p", "No training run found for these evaluations (runs tagged ilvr.train_run_id, or "
                            "--run RUN_DIR).")]
    switch = stage_switch(t.curves, t.params)
    note = f"Curves read from {t.source}."
    if switch is not None:
        note += f" The dashed black line marks the switch from stage 1 to stage 2 (after step {math.floor(switch)})."
    out.append(("p", note + " Alignment panel: cosine between the state before each latent pad and its target; "
                     "the copy baseline is what a student that copies its input scores at later pads."))
    uri = training_figure(t, sorted({r.step for r in stepped})) if figures else None
    if uri:
        out.append(("img", uri, "Training curves: loss terms, alignment, K*, learning rate, grad norm, throughput"
                    + (", evaluation during training (train.eval_every)" if t.curves.get("eval/accuracy") else "")))
    last = [(label, t.curves[k][-1]) for _, lines in TRAINING_PANELS for k, label, _ in lines if t.curves.get(k)]
    out.append(("table", ["metric", "last step", "value"], [[lab, str(s), num(v, ".4g")] for lab, (s, v) in last]))
    return out


def _accuracy_blocks(stepped: list, other: list, figures: bool) -> list:
    out: list = [("h2", "Accuracy by checkpoint")]
    benches = by_benchmark(stepped)
    if not benches:
        return out + [("p", "No checkpoint evaluations (only exported or step-less models).")]
    out.append(("p", "Accuracy with its 95% Wilson interval; in the figures the modes are offset sideways so "
                     "equal values stay visible, exported models are stars."))
    others = by_benchmark(other)
    for b, rs in benches.items():
        modes = order_names({r.mode for r in rs}, MODES)
        out.append(("h3", b))
        uri = accuracy_figure(b, rs, others.get(b, [])) if figures else None
        if uri:
            out.append(("img", uri, f"{b}: accuracy vs checkpoint step per mode with 95% intervals"))
        chance = any(is_number(r.metrics.get("baseline")) for r in rs)
        out.append(("table", ["step", "n"] + modes + (["chance: random valid plan"] if chance else []),
                    [[label, n_label(list(c.values()))] + [pct_ci(c[m].accuracy, c[m].n) if m in c else "-"
                                                           for m in modes] + ([_chance(c.values())] if chance else [])
                     for label, c in grid_rows(rs)]))
    return out


def _chance(rows) -> str:
    """The no-skill reference of the rows' maps (VSP: a random valid plan's success), as a percentage."""
    values = [r.metrics["baseline"] for r in rows if is_number(r.metrics.get("baseline"))]
    return pct(sum(values) / len(values)) if values else "-"


def _exported_blocks(meta: ReportMeta, other: list) -> list:
    if not other:
        return []
    table = []
    for b, rs in by_benchmark(other).items():
        for r in sorted(rs, key=lambda r: (r.model, mode_key(r.mode))):
            table.append([b, r.mode, "-" if r.step is None else str(r.step), pct_ci(r.accuracy, r.n),
                          _chance([r]), num(r.n, ".0f"), pct(r.metrics.get("unparseable_rate")), r.model,
                          run_link(meta, r.experiment_id, r.run_id)])
    return [("h2", "Exported model"),
            ("p", "Evaluations of exported (or step-less) models, e.g. `ilvr-export`'s output; the step is the "
                  "training step it was exported at. Chance: the success of a random valid plan (moves that stay on "
                  "the map, as many as the shortest plan) on the same maps, when the benchmark defines one."),
            ("table", ["benchmark", "mode", "step", "accuracy [95% CI]", "chance", "n", "unparseable", "model",
                       "MLflow run"], table)]


def _category_blocks(rows: list, figures: bool) -> list:
    out: list = [("h2", "Accuracy per category")]
    for b, rs in by_benchmark(rows).items():
        pick, caption = latest_per_mode(rs)
        modes = order_names(pick, MODES)
        cats = sorted({c for r in pick.values() for c in r.categories()})
        out.append(("h3", b))
        uri = category_figure(b, [r for r in rs if r.step is not None]) if figures else None
        if uri:
            out.append(("img", uri, f"{b}: accuracy per category (rows) and checkpoint step (columns), one panel per mode"))
        out.append(("p", caption + " Each cell: accuracy [95% CI] and the category's n."))
        if not cats:
            out.append(("p", "No per-category metrics."))
            continue
        per_mode = {m: pick[m].categories() for m in modes}
        out.append(("table", ["category"] + modes,
                    [[c] + [pct_ci(a, n, with_n=True) for a, n in (per_mode[m].get(c, (None, None)) for m in modes)]
                     for c in cats]))
    return out


def _mode_blocks(rows: list) -> list:
    out: list = [("h2", "Mode comparison"),
                 ("p", "Accuracy per mode; deltas in percentage points (pp). \"-\": mode not evaluated. "
                       "constant-latent and shuffled-latent replace the latent contents: if latent does not beat "
                       "them, the latents carry no information the answer uses.")]
    for b, rs in by_benchmark(rows).items():
        table = []
        for label, c in grid_rows(rs):
            acc = {m: c[m].accuracy if m in c else None for m in MODES}
            table.append([label] + [pct(acc[m]) for m in MODES] + [delta_pp(acc["latent"], acc[m]) for m in MODES[1:]])
        out += [("h3", b), ("table", ["step", *MODES, *(f"latent - {m}" for m in MODES[1:])], table)]
    return out


def _sample_blocks(data: ReportData) -> list:
    out: list = [("h2", "Sample predictions"),
                 ("p", f"The first {SAMPLES_PER_MODE} records of the latest checkpoint, in every mode; each latent "
                       "segment of a prediction is marked [latent].")]
    found = False
    for b, picks in sample_runs(data.rows).items():
        preds = {r.mode: {p.get("id"): p for p in data.predictions.get(r.run_id, [])} for r in picks}
        ids = list(next((p for p in preds.values() if p), {}).keys())
        if not ids:
            continue
        found = True
        step = picks[0].step
        out.append(("h3", f"{b} (step {step if step is not None else '?'})"))
        for i in ids:
            first = next(p[i] for p in preds.values() if i in p)
            out.append(("samples", {"id": i, "gold": first.get("gold"), "category": first.get("category"),
                                    "prompt": first.get("prompt", ""),
                                    "modes": [(m, p[i]) for m, p in preds.items() if i in p]}))
    return out if found else out + [("p", "No predictions artifacts found (predictions.jsonl of the runs).")]


def _latency_blocks(kept: list) -> list:
    table = []
    for b, rs in by_benchmark(kept).items():
        for m in order_names({r.mode for r in rs}, MODES):
            r = latest_per_mode([r for r in rs if r.mode == m])[0][m]
            g = r.metrics.get
            table.append([b, m, "-" if r.step is None else str(r.step), num(g("latency_ms_mean")),
                          num(g("latency_ms_p50")), num(g("latency_ms_p90")), num(g("tokens_per_s")),
                          num(g("latent_segments_mean"), ".2f"), pct(g("unparseable_rate")),
                          num(g("num_samples"), ".0f")])
    return [("h2", "Latency and output health"),
            ("p", "Per benchmark and mode at its latest step; latency is the time each sample waited "
                  "(its batch's decoding time: per sample at batch size 1)."),
            ("table", ["benchmark", "mode", "step", "latency mean ms", "p50 ms", "p90 ms", "tokens/s",
                       "latent segments/answer", "unparseable", "samples"], table)]


def _config_blocks(data: ReportData) -> list:
    params = data.training.params if data.training else {}
    if not params:
        return []
    key = [[k, params[k]] for k in KEY_PARAMS if k in params]
    return [("h2", "Config"), ("table", ["parameter", "value"], key),
            ("details", f"All {len(params)} parameters of the training run",
             ("table", ["parameter", "value"], [[k, params[k]] for k in sorted(params)]))]


def _run_blocks(meta: ReportMeta, training: "TrainingRun | None", kept: list) -> list:
    table = []
    if training and training.run_id and training.experiment_id:
        table.append([run_link(meta, training.experiment_id, training.run_id), "training", training.name, "-", "-",
                      training.status])
    for r in sorted(kept, key=lambda r: (r.benchmark, r.step is None, r.step or 0, mode_key(r.mode))):
        table.append([run_link(meta, r.experiment_id, r.run_id), f"eval ({r.model_kind})", r.run_name, r.benchmark,
                      "-" if r.step is None else str(r.step), r.mode])
    return [("h2", "MLflow runs"),
            ("p", f"Links open the MLflow UI at {meta.mlflow_ui} (start it with the command at the top)."),
            ("table", ["run", "kind", "name", "benchmark", "step", "mode / status"], table)]


# ------------------------------------------------------------------------------------------ rendering

def _md(text) -> str:
    """Backslash-escape what would break a table row or be read as HTML."""
    if isinstance(text, Link):
        return f"[{_md(text.text)}]({text.href})"
    return re.sub(r"([\\|<>])", r"\\\1", str(text)).replace("\n", " ")


def _clip(text: str, limit: int = MAX_PREDICTION_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f" ... [{len(text) - limit} more characters]"


def render_markdown(data: ReportData) -> str:
    """The report as GitHub-flavoured Markdown: the same tables as the HTML, figures left out."""
    out = []
    for block in _blocks(data, figures=False):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md(block[1]) + "\n")
        elif kind == "p":
            out.append(_md(block[1]) + "\n")
        elif kind == "kv":
            out.append("\n".join(f"- **{_md(k)}:** {_md(v)}" for k, v in block[1]) + "\n")
        elif kind == "table":
            out.append(_md_table(block[1], block[2]))
        elif kind == "details":
            out.append(f"{_md(block[1])}:\n\n" + _md_table(block[2][1], block[2][2]))
        elif kind == "samples":
            s = block[1]
            rows = [[m, _clip(p.get("prediction", ""), 300), str(p.get("parsed")), str(p.get("correct"))]
                    for m, p in s["modes"]]
            out.append(f"**{_md(s['id'])}** ({_md(s.get('category') or '-')}), gold: `{_md(s.get('gold'))}`\n\n"
                       + _md_table(["mode", "prediction", "parsed", "correct"], rows))
    return "\n".join(out)


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in body]) + "\n"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222;line-height:1.4}h1{margin-bottom:.3rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}table{border-collapse:collapse;margin:.5rem 0 1rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}
dl{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem}dt{font-weight:600}dd{margin:0}
figure{margin:.5rem 0}img{max-width:100%;height:auto}code{background:#f5f5f5;padding:0 .2rem}
.sample{border:1px solid #ddd;border-radius:4px;padding:.5rem .8rem;margin:.8rem 0}
.sample td.pred{text-align:left;white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;
font-size:.85rem;max-width:820px}.sample th:nth-child(2){text-align:left}pre{white-space:pre-wrap}
.latent{background:#ffe08a;border:1px solid #d4a800;border-radius:3px;padding:0 .25rem;font-weight:600}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}details{margin:.5rem 0}"""


def _cell(c) -> str:
    if isinstance(c, Link):
        return f'<a href="{html.escape(c.href)}">{html.escape(c.text)}</a>'
    return html.escape(str(c))


def _html_table(header, body) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    rows = "".join("<tr>" + "".join(f'<th scope="row">{_cell(c)}</th>' if i == 0 else f"<td>{_cell(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def mark_latents(prediction: str) -> str:
    """Escaped prediction text with each `<latent>` segment shown as a highlighted [latent] chip."""
    return html.escape(_clip(prediction)).replace("&lt;latent&gt;", '<span class="latent">[latent]</span>')


def _html_sample(s: dict) -> str:
    esc = html.escape
    rows = "".join(f'<tr><th scope="row">{esc(m)}</th><td class="pred">{mark_latents(p.get("prediction", ""))}</td>'
                   f'<td>{esc(str(p.get("parsed")))}</td><td class="{"ok" if p.get("correct") else "bad"}">'
                   f'{"correct" if p.get("correct") else "wrong"}</td></tr>' for m, p in s["modes"])
    return (f'<div class="sample"><p><strong>{esc(s["id"])}</strong> ({esc(str(s.get("category") or "-"))}) - '
            f'gold answer: <code>{esc(str(s.get("gold")))}</code></p>'
            f'<details><summary>prompt</summary><pre>{esc(_clip(s.get("prompt") or "", 3000))}</pre></details>'
            f'<table><thead><tr><th scope="col">mode</th><th scope="col">prediction</th><th scope="col">parsed</th>'
            f'<th scope="col">judged</th></tr></thead><tbody>{rows}</tbody></table></div>')


def render_html(data: ReportData) -> str:
    """The report as one HTML page: inline CSS, PNG figures as data URIs, every string escaped, no scripts."""
    esc = html.escape
    out = ['<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>ILVR report</title>', f'<style>{CSS}</style></head>', '<body>']
    for block in _blocks(data):
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "kv":
            out.append("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{_cell(v)}</dd>" for k, v in block[1]) + "</dl>")
        elif kind == "table":
            out.append(_html_table(block[1], block[2]))
        elif kind == "img":
            out.append(f'<figure><img src="{block[1]}" alt="{esc(block[2])}"><figcaption>{esc(block[2])}'
                       "</figcaption></figure>")
        elif kind == "details":
            out.append(f"<details><summary>{esc(block[1])}</summary>{_html_table(block[2][1], block[2][2])}</details>")
        elif kind == "samples":
            out.append(_html_sample(block[1]))
    out.append("</body></html>\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilvr-report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: the run dir's or sweep.json's, else MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="only this experiment (repeatable; default: all experiments)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", metavar="RUN_DIR",
                     help="a training run dir: every evaluation of it in its store, its curves from metrics.jsonl")
    src.add_argument("--parent-run-id", metavar="ID", help="only child runs of this sweep run (tag ilvr.kind = sweep)")
    src.add_argument("--sweep", metavar="SWEEP_DIR", help="a sweep directory: its sweep.json names the parent run")
    p.add_argument("--mlflow-ui", default=MLFLOW_UI, metavar="URL",
                   help=f"where the MLflow UI of the store runs, for the run links (default: {MLFLOW_UI})")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="report path ending in .html or .md; both <stem>.html and <stem>.md are written")
    return p


def _source(parser, args) -> "tuple[str | None, str | None, str | None]":
    """(store URI, sweep parent run id, training run id) from --run / --sweep / --tracking-uri / the environment."""
    parent = args.parent_run_id
    uri = train_run_id = None
    if args.sweep:
        try:
            sweep = json.loads(Path(args.sweep, "sweep.json").read_text(encoding="utf-8"))
            parent, uri = sweep["parent_run_id"], sweep.get("tracking_uri")
            if not (parent and isinstance(parent, str)):  # else every run of the store would be reported
                raise ValueError(f"parent_run_id is {parent!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--sweep {args.sweep}: cannot read parent_run_id from sweep.json ({type(e).__name__}: {e})")
    if args.run:
        found = run_store(args.run)
        if found is None:
            parser.error(f"--run {args.run}: no mlflow_run.json there; give a training run's output dir")
        uri, train_run_id = found
    return args.tracking_uri or uri or os.environ.get("MLFLOW_TRACKING_URI"), parent, train_run_id


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point of ilvr-report; returns 0, or 2 when there is nothing to report."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".md"):
        parser.error(f"--out must end in .html or .md, got {args.out!r}")
    uri, parent, train_run_id = _source(parser, args)
    if not uri:
        parser.error("no MLflow store: pass --tracking-uri URI (or set MLFLOW_TRACKING_URI, or use --run / --sweep)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"ilvr-report: no SQLite store at {uri}", file=sys.stderr)  # MLflow would create an empty one
        return 2
    prepare_server(uri, check=False)  # a failing store is reported below

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parts = [f"experiment(s) {', '.join(args.experiment)}" if args.experiment else "all experiments"]
    if parent:
        parts.append(f"children of run {parent}" + (f" (sweep {args.sweep})" if args.sweep else ""))
    if train_run_id:
        parts.append(f"evaluations of training run {train_run_id} ({args.run})")
    meta = ReportMeta(store=uri, filter="; ".join(parts), mlflow_ui=args.mlflow_ui)
    client = MlflowClient(tracking_uri=uri)
    try:
        rows = collect_runs(client, args.experiment, parent, train_run_id)
        train_id = train_run_id or _common_train_run(rows)
        training = collect_training(client, train_id, args.run)
        predictions = collect_predictions(client, uri, rows)
    except (LookupError, ValueError) as e:
        print(f"ilvr-report: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:
        print(f"ilvr-report: reading {redact_uri(uri)} failed: {redact_uri(str(e))[:500]}", file=sys.stderr)
        return 1
    if not rows:
        print(f"ilvr-report: no finished eval runs (tag ilvr.kind = eval) in {redact_uri(uri)} for "
              f"{meta.filter}", file=sys.stderr)
        return 2
    data = ReportData(rows, meta, training, predictions)
    out.parent.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out.with_suffix(".html"), out.with_suffix(".md")
    write_text_atomic(str(html_path), render_html(data))
    write_text_atomic(str(md_path), render_markdown(data))
    print(html_path)
    print(md_path)
    return 0


def _common_train_run(rows: Sequence[EvalRow]) -> "str | None":
    """The training run most of the evaluations came from (tag ilvr.train_run_id), if any."""
    counts = Counter(r.train_run_id for r in rows if r.train_run_id)
    return counts.most_common(1)[0][0] if counts else None


if __name__ == "__main__":
    sys.exit(main())
