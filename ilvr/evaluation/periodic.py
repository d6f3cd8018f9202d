"""Evaluation during training (`train.eval_every`) and the best checkpoint by it (`train.keep_best`).

Every `train.eval_every` optimizer steps all ranks run the scorer of `ilvr-eval` on `data.eval_shards` (the
first `eval.limit` records, decoded as `eval.mode` with the eval section's decoding settings) on the model
being trained; the metrics go into that step's row of metrics.jsonl and MLflow as `eval/<metric>`
(`eval/accuracy`, `eval/unparseable_rate`, `eval/num_samples`, ... as ilvr-eval names them, and
`eval/seconds`).

The same code as `ilvr-eval run`: each rank decodes records[rank::world] with
`ilvr.evaluation.evaluate.decode_records` (ilvr/model/generate.py), then `gather_and_score` gathers the rows
and scores them on every rank. Under ZeRO-3 the student's parameters are gathered once for the whole
evaluation (`ilvr.training.gather.held`, the span stage 2 uses): with every parameter resident, DeepSpeed's
hooks gather nothing, so the ranks decode different numbers of records and tokens without a collective per
forward (a rank that stopped early cannot leave another waiting); the cost is the model's full parameters
resident during the evaluation. Training is unchanged by an evaluation: each module's train/eval mode and
every RNG state (python, numpy, torch, CUDA) are put back, so the losses after it are bit for bit those of a
run without it (tests/test_periodic_eval.py).

The trainer is given this class (`Trainer(..., evaluation=PeriodicEval)`, ilvr/train.py) instead of importing it:
evaluation is built on training's pieces (checkpoints, gathering, ranks), not the other way round.

`train.keep_best: <metric>`: an evaluation better than every earlier one (`train.keep_best_mode`: max, min,
or auto = the metric's own direction) saves a checkpoint at its step (unless one is saved there anyway) and
names it in `checkpoints/best.json`, which pruning never removes (ilvr/training/checkpoint.py) and
`ilvr-export --best` exports.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

import torch

from ilvr.config import Config, ConfigError

log = logging.getLogger(__name__)
PREFIX = "eval/"


class PeriodicEval:
    """What train.eval_every and train.keep_best need on each rank; inert when train.eval_every is 0."""

    def __init__(self, cfg: Config, module, processor, latent_ids, rank: int, world_size: int, zero3: bool,
                 step: int):
        self.cfg, self.module, self.processor, self.latent_ids = cfg, module, processor, latent_ids
        self.zero3 = zero3
        self.every = cfg.train.eval_every
        self.metric = cfg.train.keep_best.removeprefix(PREFIX)
        self.mode = self._direction()
        self.best: "dict | None" = None  # the best evaluation with a checkpoint (best.json)
        self.pending: "dict | None" = None  # a new best whose checkpoint is not saved yet
        if not self.every:
            return
        from ilvr.evaluation.data import load_records
        from ilvr.evaluation.evaluate import check_references
        from ilvr.evaluation.scorers import infer_benchmark

        e = cfg.eval
        self.data = load_records(cfg.data.eval_shards, e.limit or None)
        self.benchmark = infer_benchmark(self.data.records) if e.benchmark == "auto" else e.benchmark
        check_references(self.data.records, self.benchmark)
        if self.metric == "success_rate" and self.benchmark != "vsp":
            raise ConfigError(f"train.keep_best='success_rate' is VSP's metric and data.eval_shards holds "
                              f"{self.benchmark!r} records: use train.keep_best=accuracy")
        self.mine = self.data.records[rank::world_size]
        self.best = self._recorded_best(step)
        log.info("evaluation every %d steps: %d %s records of %s (%s decoding, %d on this rank)%s", self.every,
                 len(self.data.records), self.benchmark, cfg.data.eval_shards, e.mode, len(self.mine),
                 f"; the best checkpoint by {self.metric} ({self.mode}) is kept" if self.metric else "")

    def _direction(self) -> str:
        if not self.metric or self.cfg.train.keep_best_mode != "auto":
            return self.cfg.train.keep_best_mode
        from ilvr.config_schema import RANKED_METRICS

        return RANKED_METRICS.get(self.metric, "max")  # accuracy/<category>: max

    def _recorded_best(self, step: int) -> "dict | None":
        """The run's best.json, when it ranks by this metric and direction and is not past the resumed step."""
        if not self.metric:
            return None
        from ilvr.training.checkpoint import read_best

        record = read_best(self.cfg.train.output_dir)
        if record is None or (record.get("metric"), record.get("mode")) != (self.metric, self.mode):
            return None
        if int(record.get("step", step + 1)) > step:
            log.warning("checkpoints/best.json names step %s, past the resumed step %d: the next evaluation "
                        "replaces it", record.get("step"), step)
            return None
        return record

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int, latent_norm: "float | None" = None,
            fed_mean: "Callable[[], list[float] | None] | None" = None) -> dict[str, float]:
        """Evaluate now (collective: every rank calls it at the same step); the eval/ metrics, the same on
        every rank. `fed_mean`: the mean fed-back latent state over all ranks (constant-latent mode; collective)."""
        from ilvr.evaluation.evaluate import DecodeSettings, decode_records, gather_and_score
        from ilvr.evaluation.loading import EvalModel
        from ilvr.training.gather import held
        from ilvr.training.rng import rng_state, set_rng_state

        t0 = time.perf_counter()
        e = self.cfg.eval
        settings = DecodeSettings(mode=e.mode, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                  do_sample=e.do_sample, temperature=e.temperature, seed=self.cfg.train.seed)
        constant = fed_mean() if fed_mean is not None and e.mode == "constant-latent" else None
        em = EvalModel(self.module, self.processor, self.latent_ids, self.cfg.model.latent_size, step,
                       self.cfg.train.output_dir, latent_norm=latent_norm,
                       fed_mean=torch.tensor(constant, dtype=torch.float32) if constant else None)
        rng = rng_state()
        modes = [(m, m.training) for m in self.module.modules()]
        skipped: Counter = Counter()
        try:
            self.module.eval()
            with held(self.module, self.zero3):  # every parameter resident: no collective per forward
                rows = decode_records(em, self.mine, settings, skipped)
        finally:
            for m, training in modes:
                m.training = training
            set_rng_state(rng)
        decode_s = time.perf_counter() - t0
        _, metrics, _ = gather_and_score(rows, skipped, decode_s, self.data, self.benchmark, self.cfg.data.eval_shards)
        out = {f"{PREFIX}{k}": float(v) for k, v in metrics.items()}
        out[f"{PREFIX}seconds"] = time.perf_counter() - t0
        log.info("eval at step %d: %s accuracy %.4f over %d samples (%d unparseable), %.1f s", step, self.benchmark,
                 metrics["accuracy"], int(metrics["num_samples"]), int(metrics["unparseable"]), out[f"{PREFIX}seconds"])
        self._judge(step, metrics)
        return out

    def _judge(self, step: int, metrics: dict) -> None:
        """A new best (strictly better than the best so far; the first evaluation is one) becomes pending:
        the trainer saves its checkpoint (pending_at) and it is recorded at that save (saved)."""
        if not self.metric:
            return
        value = metrics.get(self.metric)
        if value is None:
            log.warning("train.keep_best=%s: the scorer made no such metric at step %d (it made %s)", self.metric,
                        step, ", ".join(sorted(metrics)))
            return
        best = self.best["value"] if self.best else None
        if best is None or (value > best if self.mode == "max" else value < best):
            self.pending = {"step": step, "metric": self.metric, "value": float(value), "mode": self.mode}
            log.info("eval at step %d: new best %s = %.4g (before: %s)", step, self.metric, value,
                     "none" if best is None else f"{best:.4g}")

    def pending_at(self, step: int) -> "dict | None":
        """The new best to record with a checkpoint saved at `step` (None: nothing to record)."""
        return self.pending if self.pending is not None and self.pending["step"] == step else None

    def saved(self, step: int, healthy: bool) -> None:
        """A checkpoint at `step` was saved (given pending_at(step)): it is the best now, unless unhealthy."""
        record = self.pending_at(step)
        if record is None:
            return
        self.pending = None
        if healthy:
            self.best = record
            log.info("checkpoint of step %d is the best by %s (checkpoints/best.json)", step, self.metric)
        else:
            log.warning("the checkpoint of step %d evaluated best by %s but is marked unhealthy: not kept as best",
                        step, self.metric)
