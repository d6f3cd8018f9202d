"""Evaluate one model on one benchmark: batched decoding, scoring, timing, outputs, MLflow.

    result = run_evaluation(EvalRequest(model="exported/", shards="shards/vsp_test", out_dir="eval/vsp"))

With several ranks (torchrun / srun), each rank decodes records[rank::world] and rank 0
gathers the rows, scores them and writes the outputs, so the files are the same as a
single-process run's (same order, same scores). Latency is per batch: every sample of a
batch waits for the whole batch, so with batch_size 1 it is the per-sample latency.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from data_pipeline.encode import encode_prompt
from data_pipeline.records import Record, RecordError
from ilvr.evaluation.data import BenchmarkData, load_records
from ilvr.evaluation.loading import EvalModel, load_eval_model, resolve_model_path
from ilvr.evaluation.scorers import aggregate, by_plan_length, category_key, get_scorer, infer_benchmark
from ilvr.model.generate import MODES, generate
from ilvr.training.run_lock import claim_output_dir
from ilvr.training.distributed import format_duration
from ilvr.training.distributed import all_gather_json

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class DecodeSettings:
    """How answers are decoded (greedy by default, as the paper evaluates)."""

    mode: str = "latent"
    max_new_tokens: int = 512
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling (or drop --do-sample)")


@dataclass
class EvalRequest:
    model: str
    shards: str
    out_dir: str
    benchmark: str = "auto"
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    limit: int | None = None
    dtype: str = "auto"
    # default: the training run's store (training_origin), else MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    tracking_uri: str | None = None
    # default: MLFLOW_EXPERIMENT_NAME, else the training run's experiment (in its store), else "ilvr-eval"
    experiment: str | None = None
    parent_run_id: str | None = None  # makes this run a child (sweeps)
    run_name: str | None = None
    mlflow: bool = True
    device: str | None = None  # default: this rank's GPU, else CPU
    progress: bool = True  # a progress bar on rank 0 while decoding, when stderr is a terminal


class Progress:
    """Decoding progress on rank 0: a tqdm bar on a terminal; otherwise (Slurm logs, pipes) a log line at
    every tenth of the records, so a long evaluation is never silent until it ends."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)
        self.next_log = max(1, total // 10)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_log or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            log.info("decoded %d/%d samples on this rank (%.2f samples/s, eta %s)", self.done, self.total, rate,
                     format_duration(eta))
            self.next_log = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- decoding


def decode_records(em: EvalModel, records: list[Record], settings: DecodeSettings,
                   skipped: Counter | None = None, progress: bool = False) -> list[dict]:
    """One row per record that could be encoded: id, prompt, prediction, gold answer, segments, tokens,
    latency. `progress`: show decoding progress (Progress: a bar on a terminal, else log lines)."""
    rows: list[dict] = []
    generator = torch.Generator(device=em.model.device) if settings.do_sample else None
    bar = Progress(len(records), progress, f"ilvr-eval {settings.mode}")
    try:
        for start in range(0, len(records), settings.batch_size):
            rows.extend(_decode_batch(em, records, start, settings, generator, skipped))
            bar.update(len(records[start:start + settings.batch_size]))
    finally:
        bar.close()
    return rows


def _decode_batch(em: EvalModel, records: list[Record], start: int, settings: DecodeSettings,
                  generator: "torch.Generator | None", skipped: "Counter | None") -> list[dict]:
    """The rows of records[start:start + batch_size] (those that could be encoded)."""
    rows: list[dict] = []
    prompts, batch_records = [], []
    for record in records[start:start + settings.batch_size]:
        try:
            prompts.append(encode_prompt(record, em.processor))
            batch_records.append(record)
        except RecordError as e:
            if skipped is not None:
                skipped[e.reason] += 1
            log.warning("record %s cannot be evaluated: %s", record.id, e)
    if not prompts:
        return rows
    donor = settings.mode == "shuffled-latent" and len(prompts) == 1 and len(records) > 1
    if donor:  # shuffling needs a second sample: borrow one whose own answer is not kept
        prompts.append(_donor_prompt(em, records, batch_records[0]))
    if generator is not None:  # seeded by the batch's first record: no two ranks draw the same stream
        generator.manual_seed(settings.seed * 1_000_003 + zlib.crc32(batch_records[0].id.encode()))
    t0 = time.perf_counter()
    results = generate(em.model, prompts, em.processor.tokenizer, em.latent_ids, em.latent_size,
                       mode=settings.mode, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                       temperature=settings.temperature, top_p=settings.top_p, generator=generator,
                       latent_norm=em.latent_norm, constant_latent=em.fed_mean)
    latency_ms = (time.perf_counter() - t0) * 1000
    prompts = prompts[:len(batch_records)]
    for record, result in zip(batch_records, results):
        rows.append({"id": record.id, "prompt": record.question, "prediction": result.text,
                     "gold": record.answer, "latent_segments": result.num_latent_segments,
                     "num_tokens": len(result.token_ids), "finished": result.finished,
                     "latency_ms": round(latency_ms, 3), "batch_size": len(prompts)})
    return rows


def _donor_prompt(em: EvalModel, records: list[Record], other_than: Record):
    """The first encodable record that is not `other_than`, as a prompt (shuffled-latent's donor)."""
    for record in records:
        if record.id != other_than.id:
            try:
                return encode_prompt(record, em.processor)
            except RecordError:
                continue
    raise ValueError("mode 'shuffled-latent' needs at least 2 evaluable records")


def _gather_rows(rows: list[dict], skipped: Counter, wall_s: float):
    """All ranks' rows, skip counts and wall times on every rank (a no-op without a process group)."""
    dist = torch.distributed
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rows, skipped, wall_s
    gathered = all_gather_json([rows, dict(skipped), wall_s])
    total = Counter()
    for part in gathered:
        total.update(part[1])
    return [r for part in gathered for r in part[0]], total, max(part[2] for part in gathered)


# ----------------------------------------------------------------------------- scoring


def gather_and_score(rows: list[dict], skipped: Counter, wall_s: float, data: BenchmarkData, benchmark: str,
                     shards: str) -> tuple[list[dict], dict[str, float], Counter]:
    """Every rank's decoded rows (in the records' order), scored, with timing and skip counts: the same rows,
    metrics and skips on every rank (collective with a process group: all ranks call it). `skipped`: this
    rank's records that could not be encoded; the data's own skips are added."""
    rows, skipped, wall_s = _gather_rows(rows, skipped, wall_s)
    order = {r.id: i for i, r in enumerate(data.records)}
    rows.sort(key=lambda r: order[r["id"]])
    if not rows:
        raise ValueError(f"no record of {shards} could be evaluated (skipped: {dict(skipped)}); see the warnings")
    metrics = score_rows(rows, data.by_id(), benchmark)
    metrics.update(timing_metrics(rows, wall_s))
    skipped.update(data.skipped)
    metrics["skipped"] = float(sum(skipped.values()))
    metrics.update({f"skipped/{category_key(k)}": float(v) for k, v in sorted(skipped.items())})
    return rows, metrics, skipped


def score_rows(rows: list[dict], records: dict[str, Record], benchmark: str) -> dict[str, float]:
    """Add gold/parsed/correct/category to each row (in place); return the score metrics. `gold` is the
    reference the scorer compared with (CoMT: its letter), so a row can be judged without the shards."""
    scorer = get_scorer(benchmark)
    unknown = [r["id"] for r in rows if r["id"] not in records]
    if unknown:
        raise KeyError(f"{len(unknown)} predictions have ids not in the benchmark data, e.g. {unknown[0]!r}: "
                       "were they made on other shards?")
    scores = []
    for row in rows:
        s = scorer(row["prediction"], records[row["id"]])
        row.update(gold=s.gold if s.gold is not None else records[row["id"]].answer, parsed=s.parsed,
                   correct=s.correct, category=s.category, outcome=s.detail)
        if s.plan_length is not None:
            row["plan_length"] = s.plan_length
        scores.append(s)
    return aggregate(scores, benchmark)


def check_references(records: list[Record], benchmark: str) -> None:
    """Every record must be scorable by `benchmark` (VSP map, CoMT letter, Zebra answer): one error naming them."""
    scorer = get_scorer(benchmark)
    bad = []
    for record in records:
        try:
            scorer("", record)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError(f"{len(bad)} of {len(records)} records cannot be scored as {benchmark!r}, e.g. {bad[0]}; "
                         "check --benchmark and the shards (ilvr-prepare --source)")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def timing_metrics(rows: list[dict], wall_s: float) -> dict[str, float]:
    latencies = [r["latency_ms"] for r in rows]
    tokens = sum(r["num_tokens"] for r in rows)
    n = max(len(rows), 1)
    return {"latency_ms_mean": sum(latencies) / n, "latency_ms_p50": _percentile(latencies, 0.5),
            "latency_ms_p90": _percentile(latencies, 0.9), "tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "samples_per_s": len(rows) / wall_s if wall_s else 0.0,
            "latent_segments_mean": sum(r["latent_segments"] for r in rows) / n,
            "finished_rate": sum(r["finished"] for r in rows) / n, "wall_s": wall_s}


# ----------------------------------------------------------------------------- outputs


def write_json_atomic(path: str, data, lines: bool = False) -> None:
    """JSON (or JSON lines) written whole or not at all."""
    from ilvr.fileio import write_text_atomic

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in data) if lines else \
        json.dumps(data, indent=2, sort_keys=True)
    write_text_atomic(path, text)


def category_table(metrics: dict[str, float]) -> dict[str, list]:
    cats = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("accuracy/"))
    return {"category": cats, "accuracy": [metrics[f"accuracy/{c}"] for c in cats],
            "count": [int(metrics[f"count/{c}"]) for c in cats]}


@dataclass
class TrainingOrigin:
    """The training run a model comes from, as recorded with its weights: evaluations log beside it."""

    model_kind: str  # "exported" | "checkpoint"
    run_id: str | None = None  # the training run's MLflow run id
    tracking_uri: str | None = None  # its store, usable from here (None: unknown or unreachable)
    recorded_uri: str | None = None  # as recorded (credentials redacted), for messages


def training_origin(model: str) -> TrainingOrigin:
    """Where the training run of `model` logged: an export's ilvr_settings.json `mlflow`, or a checkpoint's
    trainer.json `mlflow_run_id` with its run dir's mlflow_run.json (<run>/checkpoints/step-N)."""
    from ilvr.model.ilvr_settings import SETTINGS_FILE
    from ilvr.training.mlflow_store import connectable_uri
    from ilvr.training.run_record import read_state

    kind, directory = resolve_model_path(model)
    if kind == "exported":
        with open(os.path.join(directory, SETTINGS_FILE), encoding="utf-8") as f:
            record, base = json.load(f).get("mlflow") or {}, directory
    else:
        with open(os.path.join(directory, "trainer.json"), encoding="utf-8") as f:
            run_id = json.load(f).get("mlflow_run_id")
        base = os.path.dirname(os.path.dirname(os.path.abspath(directory)))
        record = read_state(base) or {}
        record["run_id"] = run_id or record.get("run_id")
    return TrainingOrigin(kind, record.get("run_id"),
                          connectable_uri(record.get("tracking_uri"), record.get("tracking_db"), base),
                          record.get("tracking_uri"))


def experiment_of(uri: str | None, run_id: str | None) -> str | None:
    """The experiment name of `run_id` in the store `uri`, or None (no run, an unreachable store)."""
    if not (uri and run_id):
        return None
    from mlflow import MlflowClient

    from ilvr.training.mlflow_store import prepare_server

    try:
        prepare_server(uri, check=False)
        client = MlflowClient(tracking_uri=uri)
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except Exception as e:  # the store is down or the run is gone: the default experiment will do
        log.warning("MLflow: cannot look up training run %s (%s); using the default experiment", run_id,
                    type(e).__name__)
        return None


def eval_store(tracking_uri: str | None, experiment: str | None, origin: TrainingOrigin) -> tuple[str | None, str]:
    """(store, experiment) of an evaluation: given ones, else the training run's store and experiment, else
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (a None store: the Tracker's default), else "ilvr-eval"."""
    from ilvr.training.mlflow_store import redact_uri

    if origin.run_id and not origin.tracking_uri and not tracking_uri:
        log.warning("MLflow: the training run %s logged to %s, which cannot be opened from here (moved, or its "
                    "credentials are not in MLFLOW_TRACKING_URI): this evaluation is logged elsewhere; pass "
                    "--tracking-uri to put it beside its training run", origin.run_id, origin.recorded_uri)
    uri = tracking_uri or origin.tracking_uri
    if uri and uri == origin.tracking_uri and not tracking_uri:
        log.info("MLflow: logging beside training run %s in %s", origin.run_id, redact_uri(uri))
    same_store = uri is not None and uri == origin.tracking_uri
    name = (experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            or (experiment_of(uri, origin.run_id) if same_store else None) or "ilvr-eval")
    return uri, name


def eval_tags(origin: TrainingOrigin, step: int | None, parent_run_id: str | None) -> dict:
    """Tags that tie an evaluation to its training run and checkpoint (the report and the MLflow UI use them)."""
    tags = {"ilvr.kind": "eval", "ilvr.model_kind": origin.model_kind}
    if step is not None:
        tags["ilvr.checkpoint_step"] = str(step)
    if origin.run_id:
        tags["ilvr.train_run_id"] = origin.run_id
        tags["mlflow.note.content"] = f"Evaluation of training run {origin.run_id} at step {step} ({origin.model_kind})"
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def log_to_mlflow(req: EvalRequest, params: dict, metrics: dict, step: int, started: float | None = None) -> str | None:
    """One MLflow run (a child when req.parent_run_id) with params, metrics, a category table, the files; in the
    training run's store and experiment unless told otherwise, tagged with its run id and step. `started`
    (time.time() when the evaluation began): the run's start, so its duration covers loading and decoding."""
    from ilvr.training.tracking import Tracker

    try:
        origin = training_origin(req.model)
    except (OSError, ValueError) as e:  # the files are written already: log without the training run's store
        log.warning("MLflow: cannot tell which training run %s comes from (%s)", req.model, e)
        origin = TrainingOrigin("unknown")
    uri, experiment = eval_store(req.tracking_uri, req.experiment, origin)
    tracker = Tracker(rank=0, world_size=1, output_dir=req.out_dir, tracking_uri=uri, experiment=experiment,
                      attach_env_run=False)
    checkpoint_step = params["checkpoint_step"]
    tags = eval_tags(origin, checkpoint_step if checkpoint_step != "" else None, req.parent_run_id)
    run_name = req.run_name or f"{params['benchmark']}-{params['mode']}-step{params['checkpoint_step'] or 'na'}"
    run_id = tracker.start(params, run_name=run_name, tags=tags, start_time=started)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    tracker.log_table(category_table(metrics), "per_category.json")
    for name in (PREDICTIONS_FILE, METRICS_FILE):
        tracker.log_artifact(os.path.join(req.out_dir, name))
    tracker.end("FAILED" if tracker.dropped else "FINISHED")  # a run missing metrics must not look complete
    return run_id


def run_evaluation(req: EvalRequest, em: EvalModel | None = None, data: BenchmarkData | None = None) -> dict:
    """Decode, score and record one (model, benchmark, mode). Returns the metrics (on every rank)."""
    started = time.time()  # the MLflow run's start: its duration covers loading and decoding
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # every input is checked before the model loads (minutes for 7B): the model path, the shards, the references
    if em is None:
        resolve_model_path(req.model)
    data = data or load_records(req.shards, req.limit)
    benchmark = infer_benchmark(data.records) if req.benchmark == "auto" else req.benchmark
    check_references(data.records, benchmark)  # before any decoding: bad data must not cost hours of it
    # one evaluation per output dir, as for training: two into one --out both exited 0, the last writer winning
    # file by file. Held until the process ends; on a refusal every rank raises OutputDirBusy at once
    claim_output_dir(req.out_dir, setting="ilvr-eval --out")
    if rank == 0:
        log.info("%d %s records from %s; %s", len(data.records), benchmark, req.shards,
                 "loading the model" if em is None else "decoding")
    em = em or load_eval_model(req.model, req.dtype, device=req.device)

    skipped = Counter()
    t0 = time.perf_counter()
    rows = decode_records(em, data.records[rank::world], req.decode, skipped, progress=req.progress and rank == 0)
    rows, metrics, skipped = gather_and_score(rows, skipped, time.perf_counter() - t0, data, benchmark, req.shards)
    step = em.step
    params = {"model": em.source, "checkpoint_step": "" if step is None else step, "benchmark": benchmark,
              "shards": req.shards, "world_size": world, "latent_size": em.latent_size,
              "num_samples": len(rows), **{k: v for k, v in asdict(req.decode).items()}}
    result = {"benchmark": benchmark, "mode": req.decode.mode, "model": em.source, "checkpoint_step": step,
              "metrics": metrics, "params": params, "parent_run_id": req.parent_run_id, "mlflow_run_id": None}
    if by_plan_length(metrics):  # VSP: success by the shortest plan's length (the quick start prints it)
        result["by_plan_length"] = by_plan_length(metrics)
    if rank == 0:
        os.makedirs(req.out_dir, exist_ok=True)
        write_json_atomic(os.path.join(req.out_dir, PREDICTIONS_FILE), rows, lines=True)
        write_json_atomic(os.path.join(req.out_dir, METRICS_FILE), result)  # first: MLflow logs it as an artifact
        if req.mlflow:
            result["mlflow_run_id"] = log_to_mlflow(req, params, metrics, step or 0, started)
            write_json_atomic(os.path.join(req.out_dir, METRICS_FILE), result)
        if skipped:
            log.warning("%d records could not be evaluated: %s", sum(skipped.values()), dict(skipped))
        log.info("%s / %s: accuracy %.4f over %d samples (%d unparseable), %.1f tokens/s", benchmark,
                 req.decode.mode, metrics["accuracy"], len(rows), int(metrics["unparseable"]), metrics["tokens_per_s"])
    return result
