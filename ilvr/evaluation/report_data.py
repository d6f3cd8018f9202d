"""What an ilvr-report shows, gathered: the evaluation runs and the training run of an MLflow store
(collect_*, the only part of the report that talks to MLflow or reads files), their statistics (Wilson
intervals) and the selections the tables and figures are made of (ilvr/evaluation/report.py renders them)."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

from ilvr.evaluation.scorers import BENCHMARKS  # display order
from ilvr.model.generate import MODES  # display order; other modes follow alphabetically
from ilvr.training.mlflow_store import artifact_dir
from ilvr.training.run_record import read_metrics

PAGE_SIZE = 1000
EVAL_FILTER = "tags.`ilvr.kind` = 'eval' and attributes.status = 'FINISHED'"
MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address
Z95 = 1.959964
SAMPLES_PER_MODE = 3
# training curves: (panel title, [(metric key, label, line style)])
TRAINING_PANELS = (
    ("loss terms", [("loss", "loss", "-"), ("ce", "CE", "-"), ("align", "align (1 - cos)", "-")]),
    ("alignment cosine (stage 1)", [("latent/align_cos", "all pads", "-"), ("latent/align_first", "first pad", "-"),
                                    ("latent/align_later", "later pads", "-"),
                                    ("latent/align_copy", "copy baseline", "--")]),
    ("K* (selected features per segment)", [("latent/selected_mean", "K* mean", "-")]),
    ("learning rate", [("lr", "lr", "-")]),
    ("grad norm (before clipping)", [("grad_norm", "grad norm", "-")]),
    ("throughput", [("samples_per_s", "samples/s", "-")]),
    # train.eval_every: the scorer's metrics on data.eval_shards during training (drawn when the run has them)
    ("evaluation during training", [("eval/accuracy", "accuracy", "o-"),
                                    ("eval/unparseable_rate", "unparseable rate", "s:")]),
)
TRAINING_KEYS = tuple(k for _, lines in TRAINING_PANELS for k, _, _ in lines) + ("stage",)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def order_names(names, known: Sequence[str]) -> list:
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


@dataclass
class EvalRow:
    """One finished evaluation run, flattened to what the report needs (nothing MLflow-specific)."""

    run_id: str
    benchmark: str
    mode: str
    step: "int | None"  # None: a model whose checkpoint step is unknown
    model: str
    metrics: dict = field(default_factory=dict)
    start_time: int = 0  # ms since the epoch; among duplicates the newest wins
    run_name: str = ""
    parent_run_id: "str | None" = None
    experiment_id: str = ""
    train_run_id: "str | None" = None  # tag ilvr.train_run_id
    model_kind: str = "checkpoint"  # tag ilvr.model_kind: "checkpoint" | "exported"
    artifact_uri: str = ""
    shards: str = ""

    @property
    def accuracy(self) -> "float | None":
        return self.metrics.get("accuracy")

    @property
    def n(self) -> "int | None":
        n = self.metrics.get("num_samples")
        return int(n) if is_number(n) else None

    def categories(self) -> dict:
        """category -> (accuracy, count), from the accuracy/<category> and count/<category> metrics."""
        return {k[len("accuracy/"):]: (v, self.metrics.get("count/" + k[len("accuracy/"):]))
                for k, v in self.metrics.items() if k.startswith("accuracy/")}


@dataclass
class TrainingRun:
    """The training run the evaluations came from: its curves, config and where they were read."""

    run_id: "str | None"
    curves: dict = field(default_factory=dict)  # metric key -> [(step, value)]
    params: dict = field(default_factory=dict)
    source: str = ""
    experiment_id: str = ""
    name: str = ""
    status: str = ""


@dataclass
class ReportMeta:
    """What the header says about where the rows came from."""

    store: str
    filter: str = "all experiments"
    generated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    mlflow_ui: str = MLFLOW_UI


@dataclass
class ReportData:
    rows: list
    meta: ReportMeta
    training: "TrainingRun | None" = None
    predictions: dict = field(default_factory=dict)  # run id -> predictions rows (a few)


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
    model = params.get("model", "")
    kind = tags.get("ilvr.model_kind") or ("checkpoint" if re.search(r"step-\d+/?$", model) else "exported")
    return EvalRow(run_id=run.info.run_id, benchmark=params.get("benchmark") or "unknown",
                   mode=params.get("mode") or "unknown",
                   step=int(step_text) if re.fullmatch(r"-?\d+", step_text) else None,
                   model=model, metrics=dict(run.data.metrics),
                   start_time=run.info.start_time or 0, run_name=tags.get("mlflow.runName", ""),
                   parent_run_id=tags.get("mlflow.parentRunId"), experiment_id=run.info.experiment_id,
                   train_run_id=tags.get("ilvr.train_run_id"), model_kind=kind,
                   artifact_uri=run.info.artifact_uri or "", shards=params.get("shards", ""))


def _safe_id(run_id: str) -> str:
    if not re.fullmatch(r"[\w-]+", run_id):  # it goes into a filter string
        raise ValueError(f"not a run id: {run_id!r}")
    return run_id


def collect_runs(client, experiment_names: "Sequence[str] | None" = None, parent_run_id: "str | None" = None,
                 train_run_id: "str | None" = None) -> list:
    """All FINISHED eval runs (tag ilvr.kind = eval) of the experiments, optionally children of one parent
    and/or evaluations of one training run (tag ilvr.train_run_id)."""
    query = EVAL_FILTER
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{_safe_id(parent_run_id)}'"
    if train_run_id:
        query += f" and tags.`ilvr.train_run_id` = '{_safe_id(train_run_id)}'"
    ids = _experiment_ids(client, experiment_names)
    rows, token = [], None
    while ids and token != "":
        page = client.search_runs(ids, filter_string=query, max_results=PAGE_SIZE, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        rows += [_row(run) for run in page]
        token = page.token or ""
    return rows


def curves_from_jsonl(path: str) -> dict:
    """The training curves of a run dir's metrics.jsonl (the trainer's per-step log)."""
    curves: dict = {}
    for step, values in sorted(read_metrics(path).items()):
        for key, value in values:
            if key in TRAINING_KEYS:
                curves.setdefault(key, []).append((step, value))
    return curves


def collect_training(client, run_id: "str | None", run_dir: "str | None" = None) -> "TrainingRun | None":
    """The training run: curves from `run_dir`/metrics.jsonl when given, else from its MLflow run; its config
    (params) from MLflow. None when neither is available."""
    from mlflow.exceptions import MlflowException

    run = None
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
    jsonl = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if jsonl and os.path.isfile(jsonl):
        curves, source = curves_from_jsonl(jsonl), jsonl
    elif run is not None:
        curves = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
                  for k in TRAINING_KEYS if k in run.data.metrics}
        source = "its MLflow run"
    else:
        return None
    if run is None:
        return TrainingRun(run_id, curves, source=source)
    return TrainingRun(run_id, curves, dict(run.data.params), source, run.info.experiment_id,
                       run.data.tags.get("mlflow.runName", ""), run.info.status)


def _read_predictions(client, uri: str, row: EvalRow) -> list:
    """The run's predictions.jsonl artifact (local files read in place, a moved SQLite store too)."""
    local = artifact_dir(row.artifact_uri, uri) if row.artifact_uri else None
    path = os.path.join(local, "predictions.jsonl") if local else None
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            try:
                path = client.download_artifacts(row.run_id, "predictions.jsonl", tmp)
            except Exception:  # not logged, or the artifact store is unreachable: the report goes on
                return []
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def fill_gold(rows: list, shards: str, benchmark: str, cache: dict) -> None:
    """Rows written before predictions had a `gold` field: take it from the benchmark data, if still there."""
    missing = [r for r in rows if "gold" not in r]
    if not missing or not shards:
        return
    if shards not in cache:
        from ilvr.evaluation.data import load_records

        try:
            cache[shards] = load_records(shards).by_id()
        except (OSError, ValueError):
            cache[shards] = {}
    from ilvr.evaluation.scorers import get_scorer

    scorer, records = get_scorer(benchmark), cache[shards]
    for r in missing:
        if r.get("id") in records:
            s = scorer(r.get("prediction", ""), records[r["id"]])
            r["gold"] = s.gold if s.gold is not None else records[r["id"]].answer


def collect_predictions(client, uri: str, rows: Sequence[EvalRow]) -> dict:
    """A few predictions of the runs the samples section shows (the same ids in every mode)."""
    out, cache = {}, {}
    for picks in sample_runs(rows).values():
        ids = None
        for r in picks:
            preds = _read_predictions(client, uri, r)
            ids = ids or [p.get("id") for p in preds[:SAMPLES_PER_MODE]]
            chosen = [p for p in preds if p.get("id") in ids]
            fill_gold(chosen, r.shards, r.benchmark, cache)
            out[r.run_id] = chosen
    return out


# ------------------------------------------------------------------------------------------ statistics

def wilson(k: float, n: float, z: float = Z95) -> "tuple[float, float]":
    """Wilson score interval of k successes in n trials: sane at 0% and 100%, unlike the normal one."""
    if not n:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci(acc, n) -> "tuple[float, float] | None":
    return wilson(round(acc * n), n) if is_number(acc) and is_number(n) and n > 0 else None


# ------------------------------------------------------------------------------------------ selection

def dedupe(rows: Sequence[EvalRow]) -> "tuple[list, int]":
    """Keep the newest run per (benchmark, mode, step, model); returns (kept, number dropped)."""
    best: dict = {}
    for r in rows:
        key = (r.benchmark, r.mode, r.step, r.model)
        if key not in best or (r.start_time, r.run_id) > (best[key].start_time, best[key].run_id):
            best[key] = r
    return list(best.values()), len(rows) - len(best)


def split_stepped(rows: Sequence[EvalRow]) -> "tuple[list, list]":
    """(checkpoint runs with a step: the curves over training, everything else: exported or step-less models)."""
    stepped = [r for r in rows if r.model_kind != "exported" and r.step is not None]
    return stepped, [r for r in rows if r not in stepped]


def grid_rows(rows: Sequence[EvalRow]) -> list:
    """Table rows [(label, {mode: row})] by step; the model is added to the label when a step has several."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r.step, r.model), {})[r.mode] = r
    keys = sorted(cells, key=lambda k: (k[0] is None, k[0] or 0, k[1]))
    steps = [step for step, _ in keys]
    return [(f"{model or '?'} (step unknown)" if step is None
             else f"{step} ({model})" if steps.count(step) > 1 else str(step), cells[(step, model)])
            for step, model in keys]


def latest_per_mode(rows: Sequence[EvalRow]) -> "tuple[dict, str]":
    """{mode: newest row at the highest step} (step-less rows only if nothing has a step), and a caption."""
    stepped = [r for r in rows if r.step is not None]
    top = max((r.step for r in stepped), default=None)
    pool = [r for r in stepped if r.step == top] if stepped else list(rows)
    pick: dict = {}
    for r in sorted(pool, key=lambda r: (r.start_time, r.run_id)):
        pick[r.mode] = r
    caption = f"At step {top}." if stepped else "No run has a checkpoint step; newest run per mode."
    return pick, caption


def mode_key(mode: str) -> tuple:
    return (MODES.index(mode) if mode in MODES else len(MODES), mode)


def by_benchmark(rows: Sequence[EvalRow]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r.benchmark, []).append(r)
    return {b: out[b] for b in order_names(out, BENCHMARKS)}


def sample_runs(rows: Sequence[EvalRow]) -> dict:
    """benchmark -> the runs whose predictions are shown: the latest checkpoint's, one per mode."""
    kept, _ = dedupe(rows)
    stepped, other = split_stepped(kept)
    out = {}
    for b, rs in by_benchmark(stepped or other).items():
        pick, _ = latest_per_mode(rs)
        out[b] = [pick[m] for m in order_names(pick, MODES)]
    return out


def n_label(rows: Sequence[EvalRow]) -> str:
    ns = sorted({r.n for r in rows if r.n})
    return "/".join(str(n) for n in ns) or "?"


def stage_switch(curves: dict, params: dict) -> "float | None":
    """The x of the stage-1 -> stage-2 switch: where the `stage` metric first exceeds 1, else the recipe's
    train.stage1_steps of a "1+2" schedule (between its last stage-1 step and the next)."""
    stage = curves.get("stage") or []
    for (s0, v0), (s1, v1) in zip(stage, stage[1:]):
        if v0 < 2 <= v1:
            return (s0 + s1) / 2
    if params.get("train.stage") == "1+2" and str(params.get("train.stage1_steps", "")).isdigit():
        return int(params["train.stage1_steps"]) + 0.5
    return None
