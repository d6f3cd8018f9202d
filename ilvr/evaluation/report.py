"""ilvr-report: evaluation runs in an MLflow store -> one self-contained HTML report plus Markdown.

    ilvr-report --tracking-uri sqlite:///runs/x/mlflow.db --sweep runs/x/sweep --out report.html

Gathering (collect_runs, the only part that talks to MLflow) is kept apart from rendering
(render_markdown / render_html / svg_line_chart: plain rows in, text out), so a report can be tested
and re-rendered without a store. Both formats are built from the same blocks, so their tables agree.
Accuracies and rates are fractions in [0, 1], as the evaluation CLI logs them, shown as percents.
The HTML has inline CSS and hand-drawn inline SVG only: no JavaScript, no external files.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ilvr.evaluation.scorers import BENCHMARKS  # display order
from ilvr.model.generate import MODES  # display order; other modes follow alphabetically
from ilvr.training.checkpoint import write_text_atomic
from ilvr.training.tracking import prepare_server, redact_uri

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3")  # lines stay distinguishable without colour
PAGE_SIZE = 1000
EVAL_FILTER = "tags.`ilvr.kind` = 'eval' and attributes.status = 'FINISHED'"


@dataclass
class EvalRow:
    """One finished evaluation run, flattened to what the report needs (nothing MLflow-specific)."""

    run_id: str
    benchmark: str
    mode: str
    step: "int | None"  # None: an exported model whose checkpoint step is unknown
    model: str
    metrics: dict = field(default_factory=dict)
    start_time: int = 0  # ms since the epoch; among duplicates the newest wins
    run_name: str = ""
    parent_run_id: "str | None" = None

    @property
    def accuracy(self) -> "float | None":
        return self.metrics.get("accuracy")

    def categories(self) -> dict:
        """category -> (accuracy, count), from the accuracy/<category> and count/<category> metrics."""
        return {k[len("accuracy/"):]: (v, self.metrics.get("count/" + k[len("accuracy/"):]))
                for k, v in self.metrics.items() if k.startswith("accuracy/")}


@dataclass
class ReportMeta:
    """What the header says about where the rows came from."""

    store: str
    filter: str = "all experiments"
    generated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


# ----------------------------------------------------------------------------------------- gathering

def _experiment_ids(client, names: "Sequence[str] | None") -> list:
    if names:
        ids = []
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise LookupError(f"no MLflow experiment named {name!r} in this store")
            ids.append(exp.experiment_id)
        return ids
    ids, token = [], None
    while token != "":  # MLflow pages end with an empty or None token
        page = client.search_experiments(max_results=PAGE_SIZE, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token or ""
    return ids


def _row(run) -> EvalRow:
    params, tags = run.data.params, run.data.tags
    step_text = params.get("checkpoint_step", "").strip()
    return EvalRow(run_id=run.info.run_id, benchmark=params.get("benchmark") or "unknown",
                   mode=params.get("mode") or "unknown",
                   step=int(step_text) if re.fullmatch(r"-?\d+", step_text) else None,
                   model=params.get("model", ""), metrics=dict(run.data.metrics),
                   start_time=run.info.start_time or 0, run_name=tags.get("mlflow.runName", ""),
                   parent_run_id=tags.get("mlflow.parentRunId"))


def collect_runs(client, experiment_names: "Sequence[str] | None" = None,
                 parent_run_id: "str | None" = None) -> list:
    """All FINISHED eval runs (tag ilvr.kind = eval) of the experiments, optionally children of one parent."""
    query = EVAL_FILTER
    if parent_run_id:
        if not re.fullmatch(r"[\w-]+", parent_run_id):  # it goes into a filter string
            raise ValueError(f"not a run id: {parent_run_id!r}")
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    ids = _experiment_ids(client, experiment_names)
    rows, token = [], None
    while ids and token != "":
        page = client.search_runs(ids, filter_string=query, max_results=PAGE_SIZE, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        rows += [_row(run) for run in page]
        token = page.token or ""
    return rows


def dedupe(rows: Sequence[EvalRow]) -> "tuple[list, int]":
    """Keep the newest run per (benchmark, mode, step, model); returns (kept, number dropped)."""
    best: dict = {}
    for r in rows:
        key = (r.benchmark, r.mode, r.step, r.model)
        if key not in best or (r.start_time, r.run_id) > (best[key].start_time, best[key].run_id):
            best[key] = r
    return list(best.values()), len(rows) - len(best)


# ------------------------------------------------------------------------------------------ formatting

def _ok(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def pct(v) -> str:
    return f"{100 * v:.1f}%" if _ok(v) else "-"


def delta_pp(a, b) -> str:
    """Difference of two accuracies in percentage points, signed."""
    return f"{100 * (a - b):+.1f} pp" if _ok(a) and _ok(b) else "-"


def num(v, spec: str = ".1f") -> str:
    return format(v, spec) if _ok(v) else "-"


def _order(names, known: Sequence[str]) -> list:
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


def _grid(rows: Sequence[EvalRow]) -> list:
    """Table rows [(label, {mode: row})]: by step, then step-less models by name.

    Rows are keyed (step, model) so two training runs at the same step are never mixed; the model is
    added to the label only when a step has more than one.
    """
    cells: dict = {}
    for r in rows:
        cells.setdefault((r.step, r.model), {})[r.mode] = r
    keys = sorted(cells, key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    steps = [step for step, _ in keys]
    return [(f"{model or '?'} (step unknown)" if step is None
             else f"{step} ({model})" if steps.count(step) > 1 else str(step), cells[(step, model)])
            for step, model in keys]


def _latest(rows: Sequence[EvalRow]) -> "tuple[dict, str]":
    """{mode: newest row at the highest step} (step-less rows only if nothing has a step), and a caption."""
    stepped = [r for r in rows if r.step is not None]
    top = max((r.step for r in stepped), default=None)
    pool = [r for r in stepped if r.step == top] if stepped else list(rows)
    pick: dict = {}
    for r in sorted(pool, key=lambda r: (r.start_time, r.run_id)):
        pick[r.mode] = r
    caption = f"At step {top}." if stepped else "No run has a checkpoint step; newest run per mode."
    return pick, caption


# ------------------------------------------------------------------------------------------ SVG chart

def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list:
    """Round tick values covering [lo, hi] (1/2/2.5/5 x 10^k apart)."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def svg_line_chart(series: Mapping[str, Sequence[tuple]], title: str, x_label: str = "checkpoint step",
                   y_label: str = "accuracy", y_range: "tuple | None" = None,
                   y_format: Callable[[float], str] = "{:g}".format, width: int = 640, height: int = 320,
                   chart_id: str = "chart", point_format: "Callable[[float], str] | None" = None) -> str:
    """An inline SVG line chart: axes, ticks, legend, a <title>/<desc> for screen readers, and a
    tooltip <title> on each point (hover text without JavaScript). `series`: name -> [(x, y)].
    `chart_id` must be unique within a page (aria-labelledby refers to it); `point_format` (default
    `y_format`) writes values in the description and tooltips, `y_format` the tick labels."""
    pf = point_format or y_format
    esc = html.escape
    clean = {name: sorted((float(x), float(y)) for x, y in pts if _ok(x) and _ok(y)) for name, pts in series.items()}
    xs = [x for pts in clean.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in clean.values() for _, y in pts] or [0.0, 1.0]
    xt = _ticks(min(xs), max(xs), integer=all(x == int(x) for x in xs))
    lo, hi = y_range or (min(ys), max(ys))
    yt = _ticks(min(lo, min(ys)), max(hi, max(ys)))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    left, right, top, bottom = 64, 170, 34, 48
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1.0) * ph

    desc = "; ".join(f"{name}: " + (", ".join(f"{x:g} -> {pf(y)}" for x, y in pts) or "no data")
                     for name, pts in clean.items())
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="{esc(chart_id)}-title {esc(chart_id)}-desc" '
           f'font-family="sans-serif" font-size="12">',
           f'<title id="{esc(chart_id)}-title">{esc(title)}</title>',
           f'<desc id="{esc(chart_id)}-desc">{esc(desc)}</desc>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{esc(title)}</text>']
    for t in yt:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(y_format(t))}</text>')
    for t in xt:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 5}" stroke="#333"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{t:g}</text>')
    out.append(f'<path d="M{left},{top} V{top + ph} H{left + pw}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{esc(y_label)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color, dash = COLORS[i % len(COLORS)], DASHES[i % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if len(pts) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{esc(f"{name}, step {x:g}: {pf(y)}")}</title></circle>')
        ly, short = top + 8 + 18 * i, name if len(name) <= 22 else name[:21] + "\u2026"
        hover = f"<title>{esc(name)}</title>" if short != name else ""  # the full name of a cut legend entry
        out.append(f'<line x1="{left + pw + 14}" y1="{ly}" x2="{left + pw + 38}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"{dash_attr}/><text x="{left + pw + 44}" y="{ly + 4}">{esc(short)}{hover}</text>')
    out.append("</svg>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ report content

def _blocks(rows: Sequence[EvalRow], meta: ReportMeta) -> list:
    """The report as neutral blocks: (h1|h2|h3|p, text), (kv, pairs), (table, header, rows), (svg, text)."""
    kept, dropped = dedupe(rows)
    out: list = [("h1", "ILVR evaluation report"),
                 ("kv", [("Store", redact_uri(meta.store)), ("Filter", meta.filter),
                         ("Generated", meta.generated_at), ("Runs", str(len(kept)))])]
    if dropped:
        out.append(("p", f"{dropped} duplicate run(s) dropped: for the same benchmark, mode, checkpoint step "
                         f"and model only the newest run counts."))
    by_bench: dict = {}
    for r in kept:
        by_bench.setdefault(r.benchmark, []).append(r)
    benches = _order(by_bench, BENCHMARKS)

    out.append(("h2", "Accuracy by checkpoint"))
    for b in benches:
        rs, modes = by_bench[b], _order({r.mode for r in by_bench[b]}, MODES)
        out.append(("h3", b))
        series = _series(rs, modes)
        if series:
            out.append(("svg", svg_line_chart(series, f"{b}: accuracy vs checkpoint step", y_range=(0.0, 1.0),
                                              y_format=lambda v: f"{100 * v:g}%", point_format=pct,
                                              chart_id=f"chart-{_slug(b)}")))
        out.append(("table", ["step"] + modes,
                    [[label] + [pct(c[m].accuracy) if m in c else "-" for m in modes] for label, c in _grid(rs)]))

    out.append(("h2", "Accuracy per category"))
    for b in benches:
        pick, caption = _latest(by_bench[b])
        modes = _order(pick, MODES)
        cats = sorted({c for r in pick.values() for c in r.categories()})
        out += [("h3", b), ("p", caption)]
        if not cats:
            out.append(("p", "No per-category metrics."))
            continue
        per_mode = {m: pick[m].categories() for m in modes}
        table = [[c] + [pct(a) + (f" (n={n:.0f})" if _ok(n) and _ok(a) else "")
                        for a, n in (per_mode[m].get(c, (None, None)) for m in modes)] for c in cats]
        out.append(("table", ["category"] + modes, table))

    out.append(("h2", "Mode comparison"))
    out.append(("p", "Accuracy per mode; deltas in percentage points (pp). \"-\": mode not evaluated."))
    for b in benches:
        table = []
        for label, c in _grid(by_bench[b]):
            acc = {m: c[m].accuracy if m in c else None for m in MODES}
            table.append([label] + [pct(acc[m]) for m in MODES]
                         + [delta_pp(acc["latent"], acc[m]) for m in MODES[1:]])
        out += [("h3", b), ("table", ["step", *MODES, *(f"latent - {m}" for m in MODES[1:])], table)]

    out.append(("h2", "Latency and output health"))
    out.append(("p", "Per benchmark and mode at its latest step; latency is the time each sample waited "
                     "(its batch's decoding time: per sample at batch size 1)."))
    table = []
    for b in benches:
        for m in _order({r.mode for r in by_bench[b]}, MODES):
            r = _latest([r for r in by_bench[b] if r.mode == m])[0][m]
            g = r.metrics.get
            table.append([b, m, "-" if r.step is None else str(r.step), num(g("latency_ms_mean")),
                          num(g("latency_ms_p50")), num(g("latency_ms_p90")), num(g("tokens_per_s")),
                          num(g("latent_segments_mean"), ".2f"), pct(g("unparseable_rate")),
                          num(g("num_samples"), ".0f")])
    out.append(("table", ["benchmark", "mode", "step", "latency mean ms", "p50 ms", "p90 ms", "tokens/s",
                          "latent segments/answer", "unparseable", "samples"], table))
    return out


def _series(rows: Sequence[EvalRow], modes: Sequence[str]) -> dict:
    """Chart lines: one per mode; per mode and model folder when runs of several trainings share a step."""
    pts = [r for r in rows if r.step is not None and _ok(r.accuracy)]
    clash = len({(r.mode, r.step) for r in pts}) < len(pts)
    series: dict = {}
    for m in modes:
        for r in sorted((r for r in pts if r.mode == m), key=lambda r: (r.step, r.model)):
            name = f"{m} ({os.path.dirname(r.model.rstrip('/')) or r.model})" if clash else m
            series.setdefault(name, []).append((r.step, r.accuracy))
    return series


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)


# ------------------------------------------------------------------------------------------ rendering

def _md(text: str) -> str:
    """Backslash-escape what would break a table row or be read as HTML."""
    return re.sub(r"([\\|<>])", r"\\\1", str(text)).replace("\n", " ")


def render_markdown(rows: Sequence[EvalRow], meta: ReportMeta) -> str:
    """The report as GitHub-flavoured Markdown: same tables as the HTML, charts left out."""
    out = []
    for block in _blocks(rows, meta):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md(block[1]) + "\n")
        elif kind == "p":
            out.append(_md(block[1]) + "\n")
        elif kind == "kv":
            out.append("\n".join(f"- **{_md(k)}:** {_md(v)}" for k, v in block[1]) + "\n")
        elif kind == "table":
            header, body = block[1], block[2]
            lines = ["| " + " | ".join(_md(h) for h in header) + " |",
                     "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
            lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in body]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;
padding:0 1rem;color:#222;line-height:1.4}h1{margin-bottom:.3rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0 1rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th:first-child,td:first-child{text-align:left}
thead th{background:#f3f3f3}dl{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem}dt{font-weight:600}
dd{margin:0}figure{margin:.5rem 0}svg{max-width:100%;height:auto}"""


def render_html(rows: Sequence[EvalRow], meta: ReportMeta) -> str:
    """The report as one HTML page: inline CSS and SVG, every string escaped, no scripts."""
    esc = html.escape
    out = ['<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>ILVR evaluation report</title>', f'<style>{CSS}</style></head>', '<body>']
    for block in _blocks(rows, meta):
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "kv":
            out.append("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in block[1]) + "</dl>")
        elif kind == "table":
            head = "".join(f'<th scope="col">{esc(h)}</th>' for h in block[1])
            body = "".join("<tr>" + "".join(f'<th scope="row">{esc(c)}</th>' if i == 0 else f"<td>{esc(c)}</td>"
                                            for i, c in enumerate(row)) + "</tr>" for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "svg":
            out.append(f"<figure>{block[1]}</figure>")  # built from escaped parts by svg_line_chart
    out.append("</body></html>\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilvr-report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: the sweep.json's, else MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="only this experiment (repeatable; default: all experiments)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--parent-run-id", metavar="ID", help="only child runs of this eval-sweep run")
    src.add_argument("--sweep", metavar="SWEEP_DIR", help="a sweep directory: its sweep.json names the parent run")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="report path ending in .html or .md; both <stem>.html and <stem>.md are written")
    return p


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point of ilvr-report; returns 0, or 2 when there is nothing to report."""
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".md"):
        parser.error(f"--out must end in .html or .md, got {args.out!r}")
    parent, sweep_uri = args.parent_run_id, None
    if args.sweep:
        try:
            sweep = json.loads(Path(args.sweep, "sweep.json").read_text(encoding="utf-8"))
            parent, sweep_uri = sweep["parent_run_id"], sweep.get("tracking_uri")
            if not (parent and isinstance(parent, str)):  # else every run of the store would be reported
                raise ValueError(f"parent_run_id is {parent!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--sweep {args.sweep}: cannot read parent_run_id from sweep.json ({type(e).__name__}: {e})")
    uri = args.tracking_uri or sweep_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        parser.error("no MLflow store: pass --tracking-uri URI (or set MLFLOW_TRACKING_URI, or use --sweep)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"ilvr-report: no SQLite store at {uri}", file=sys.stderr)  # MLflow would create an empty one
        return 2
    prepare_server(uri, check=False)  # a failing store is reported below

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parts = [f"experiment(s) {', '.join(args.experiment)}" if args.experiment else "all experiments"]
    if parent:
        parts.append(f"children of run {parent}" + (f" (sweep {args.sweep})" if args.sweep else ""))
    meta = ReportMeta(store=uri, filter="; ".join(parts))
    try:
        rows = collect_runs(MlflowClient(tracking_uri=uri), args.experiment, parent)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out.with_suffix(".html"), out.with_suffix(".md")
    write_text_atomic(str(html_path), render_html(rows, meta))
    write_text_atomic(str(md_path), render_markdown(rows, meta))
    print(html_path)
    print(md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
