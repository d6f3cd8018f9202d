"""The ILVR training loop on DeepSpeed: student engine, momentum teacher, data, checkpoints, tracking.

    Trainer(cfg, ds_config="ds_configs/zero3.json", resume="auto", evaluation=PeriodicEval).run()

`evaluation` (ilvr.evaluation.periodic.PeriodicEval, as ilvr-train passes it) runs train.eval_every and
train.keep_best; without it a config that asks for evaluations is refused.

One optimizer step = `train.grad_accum` micro-batches. Stage 1 (teacher-forced, with the
momentum teacher) runs for `train.stage1_steps` steps of a "1+2" schedule, then stage 2
(free-running latents). Every rank makes the same module calls each step (vision tower
always run, stage-2 calls padded to the largest segment count of any rank), or ZeRO-3
would deadlock.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import torch

from ilvr.config import Config, ConfigError
from ilvr.training.distributed import (
    DistInfo,
    all_reduce,
    dist_info_from_env,
    init_distributed,
    share_cpu_threads,
    setup_logging,
    summed_over_ranks,
)
from ilvr.training.faults import BadStepGuard, StopRequest

log = logging.getLogger(__name__)
FINISHED_FILE = "finished.json"  # written when a run reaches train.max_steps (slurm/train.sh reads it)


def stage_at(cfg: Config, step: int) -> int:
    """Which stage optimizer step `step` (0-based) trains."""
    if cfg.train.stage == "1+2":
        return 1 if step < cfg.train.stage1_steps else 2
    return int(cfg.train.stage)


class NoEvaluation:
    """The evaluator of a Trainer given none: it evaluates never (train.eval_every must be 0, config_checks)."""

    def __init__(self, cfg: Config, *_):
        if cfg.train.eval_every:
            raise ConfigError(f"train.eval_every={cfg.train.eval_every} and this Trainer has no evaluator: build it "
                              "with Trainer(..., evaluation=ilvr.evaluation.periodic.PeriodicEval), as ilvr-train does")

    def due(self, step: int) -> bool:
        return False

    def pending_at(self, step: int) -> None:
        return None

    def saved(self, step: int, healthy: bool) -> None:
        pass


class Trainer:
    def __init__(self, cfg: Config, ds_config: "str | dict", resume: str = "auto", allow_config_change: bool = False,
                 evaluation: "Callable[..., Any] | None" = None):
        self.cfg = cfg
        # evaluation during training (train.eval_every, keep_best): built in setup() from the model being trained;
        # ilvr/train.py passes ilvr.evaluation.periodic.PeriodicEval (evaluation sits above training)
        self.evaluation = evaluation or NoEvaluation
        self.ds_config_arg = ds_config
        self.resume_arg = resume
        self.allow_config_change = allow_config_change  # continue a run whose recorded config differs (run_dir.py)
        from ilvr.training.progress import StepClock

        self._clock = StepClock()  # wall time per step of each stage, since this process's first step line: the ETA
        self._schedule_note: "str | None" = None  # how train.epochs became train.max_steps
        self.step = 0
        self.saved_step = -1
        self.history: list[dict[str, float]] = []
        from ilvr.training.latent_stats import LatentStats

        self.latents = LatentStats(cfg)  # latent/* metrics; target norm, fed-back mean, the latent_rescale norm
        self.stage2_checkpoint = False  # stage 2's per-call activation checkpointing (model.gradient_checkpointing)
        from ilvr.training.health import LossWatch

        self.losses = LossWatch()  # recent mean losses over ranks: the loss-spike check of each save (health.py)
        self.grad_norm: "float | None" = None  # the last step's, for the same checks

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.info: DistInfo = dist_info_from_env()
        setup_logging(self.info)
        threads = share_cpu_threads()
        if threads is not None:
            log.info("OMP_NUM_THREADS unset: %d torch threads per rank (torch's count / local ranks)", threads)
        init_distributed(self.info, cfg.train.collective_timeout)
        from ilvr.training.run_lock import claim_output_dir

        # one job per output dir, before anything (MLflow's store included) is written there: rank 0 locks
        # <output_dir>/.lock for the process's life; on a refusal every rank raises OutputDirBusy at once
        claim_output_dir(cfg.train.output_dir)
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        from ilvr.training.run_dir import agree_on_start

        # train.epochs -> steps; continue, start or refuse (rank 0 decides, all ranks take it), before anything is built
        self.plan, self._schedule_note = agree_on_start(cfg, self.info, self.resume_arg, self.allow_config_change)

        from data_pipeline.tiny_processor import load_processor

        self.processor, self.latent_ids = load_processor(cfg.data.processor)
        self._apply_pixel_budget()
        from ilvr.training.engines import build_student, build_teacher, resolved_ds_config

        self.ds_config = resolved_ds_config(self.ds_config_arg, cfg, self.info.world_size)
        self.student = build_student(cfg, self.ds_config, self.processor, self.latent_ids, self._wants_teacher())
        self.engine = self.student.engine
        self.teacher = (build_teacher(cfg, self.ds_config, self.student, self.processor, self.latent_ids)
                        if self._wants_teacher() else None)
        self.loader = self._build_loader()
        from ilvr.training.comm_stats import CommStats

        self.comm = CommStats(self.info.world_size)
        from ilvr.training.elastic import ElasticCheckpointManager
        from ilvr.training.tracking import Tracker

        self.checkpoints = ElasticCheckpointManager(cfg.train.output_dir, cfg.train.keep_last, processor=self.processor)
        self.tracker = Tracker(rank=self.info.rank, output_dir=cfg.train.output_dir, end_on_exit="FAILED")
        self.run_id = self._resume()
        self.evals = self.evaluation(cfg, self.engine.module, self.processor, self.latent_ids, self.info.rank,
                                       self.info.world_size, self._zero3(), self.step)  # train.eval_every, keep_best
        self.run_id = self.tracker.start(cfg, run_name=os.path.basename(os.path.abspath(cfg.train.output_dir)),
                                         resume_run_id=self.run_id, world_size=self.info.world_size,
                                         tags={"ilvr.kind": "train"})
        from ilvr.training.run_dir import record_config

        if self.info.is_main:  # config.resolved.yaml etc. for a new run or a resume with allowed changes
            record_config(cfg, self.plan, self._schedule_note, self.ds_config, self.tracker)

    def _apply_pixel_budget(self) -> None:
        """data.min_pixels / data.max_pixels into the processor (saved with every checkpoint's processor/)."""
        from data_pipeline.pixel_budget import apply_pixel_budget

        d = self.cfg.data
        try:
            low, high = apply_pixel_budget(self.processor.image_processor, d.min_pixels, d.max_pixels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        log.info("images resized to %d..%d pixels (data.min_pixels / data.max_pixels; 0 = the processor's)", low, high)

    def _zero3(self) -> bool:
        from ilvr.training.engines import is_zero3

        return is_zero3(self.ds_config)

    def _wants_teacher(self) -> bool:
        return self.cfg.train.stage in ("1", "1+2") and self.cfg.loss.targets == "teacher"

    def _build_loader(self):
        from data_pipeline.pipeline import build_train_loader

        return build_train_loader(self.cfg.data, self.cfg.model.latent_size, self.info.rank, self.info.world_size,
                                  self.processor, self.latent_ids)

    def _resume(self) -> "str | None":
        from ilvr.training.checkpoint import resolve_resume

        # verified on all ranks alike: "auto" skips (and logs) checkpoints that fail, an explicit one raises
        path = resolve_resume(self.resume_arg, self.cfg.train.output_dir, collective=True)
        if path is None:
            return os.environ.get("MLFLOW_RUN_ID")
        if self.teacher is not None and stage_at(self.cfg, int(self._peek_step(path))) == 2:
            self.teacher = None  # the checkpoint is past stage 1: no teacher state to load
        load_teacher = self._teacher_io("load")
        # restores RNG too; saved on another world size: converted once and re-partitioned (elastic.py)
        trainer_state, rank_state = self.checkpoints.load(self.engine, path, load_teacher,
                                                          verify=False)  # resolve_resume just verified it
        self.step = self.saved_step = int(trainer_state["step"])
        self.history = list(trainer_state.get("history", []))
        self.latents.norm = trainer_state.get("latent_norm")
        from ilvr.training.health import LossWatch

        self.losses = LossWatch(trainer_state.get("loss_window"))
        saved_world = int(trainer_state.get("world_size", self.info.world_size))
        if saved_world == self.info.world_size and not self.loader.layout_changed(rank_state["loader"]):
            self.loader.load_state_dict(rank_state["loader"])
            self.latents.load_rank_state(rank_state)
        else:  # another rank x worker layout: the data position is re-planned, per-rank statistics merged
            from ilvr.training.elastic import replan_loader, saved_rank_states

            states = saved_rank_states(path, saved_world)
            replan_loader(self.loader, [s["loader"] for s in states])
            self.latents.merge_rank_states(states)
        if self.info.is_main:  # steps past the checkpoint are trained (and logged) again
            from ilvr.training.run_record import METRICS_FILE, truncate_metrics

            truncate_metrics(os.path.join(self.cfg.train.output_dir, METRICS_FILE), self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return trainer_state.get("mlflow_run_id")

    @staticmethod
    def _peek_step(path: str) -> int:
        with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
            return int(json.load(f)["step"])

    def _teacher_io(self, what: str):
        """The checkpoint callable that saves/loads this rank's teacher state under <checkpoint>/teacher."""
        if self.teacher is None:
            return None
        method = getattr(self.teacher, what)
        return lambda ckpt_dir: method(os.path.join(ckpt_dir, "teacher"), self.info.rank)

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: dict) -> dict:
        device = self.engine.device
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _loss(self, batch: dict, stage: int, generator: torch.Generator):
        from ilvr.model.stage1 import stage1_loss
        from ilvr.model.stage2 import stage2_loss

        from ilvr.model.selection import pooled_targets, select_targets
        from ilvr.training.gather import held

        module, k = self.engine.module, self.cfg.model.latent_size
        if stage == 1 and self.cfg.loss.targets == "pooled":  # the ablation: the student's own pooled features
            return stage1_loss(module, None, batch, self.cfg.loss, k, generator=generator,
                               latent_norm=self.latents.norm_so_far(), selection=pooled_targets(module, batch, k))
        if stage == 1:  # targets come from the momentum teacher, never from the student
            teacher = self.teacher.module
            with self.teacher.active(), held(teacher.model, self._gather_once()):  # one gather of the teacher per step
                selection = select_targets(teacher, batch, self.cfg.loss, k)
            return stage1_loss(module, teacher, batch, self.cfg.loss, k, generator=generator,
                               latent_norm=self.latents.norm_so_far(), selection=selection)
        local = [int(batch["latent_segments"][:, 0].bincount().max()) if batch["latent_segments"].numel() else 0]
        s_max = int(all_reduce(local, "max")[0])
        return stage2_loss(module, batch, always_run_vision=True, min_segments=s_max, min_steps=k,
                           latent_norm=self.latents.norm, checkpoint_calls=self.stage2_checkpoint)

    def _gather_once(self) -> bool:
        return self._zero3() and self.cfg.train.gather_once

    def _gather_span(self, stage: int):
        """Stage 2 under ZeRO-3 with train.gather_once: the language model's parameters are gathered once
        for the micro-batch's forward AND backward (docs/training.md, "Stage 2 under ZeRO-3")."""
        from ilvr.training.gather import held

        return held(self.engine.module, stage == 2 and self._gather_once())

    def _start_stage2(self) -> None:
        """At each stage-2 step (acts once): release the teacher, swap transformers' per-layer gradient
        checkpointing (which drops the KV cache stage 2 feeds latents through) for per-call checkpointing,
        and fix the latent_rescale norm (latent_stats.py)."""
        if self.teacher is not None:
            log.info("stage 2 from step %d on: the momentum teacher is released", self.step + 1)
            self.teacher = None
        module = self.engine.module
        if getattr(module, "is_gradient_checkpointing", False):
            module.gradient_checkpointing_disable()  # transformers' per-layer form drops the KV cache
            self.stage2_checkpoint = True
            log.info("stage 2 from step %d on: activation checkpointing per decoder call (the KV cache is "
                     "rebuilt inside each checkpointed call) instead of transformers' per-layer form", self.step + 1)
        self.latents.fix_norm()

    def run(self) -> dict[str, float]:
        self.setup()
        cfg, engine = self.cfg, self.engine
        stop = StopRequest()
        guard = BadStepGuard(cfg.train.max_bad_steps)
        generator = torch.Generator()  # target noise; re-seeded per step so a resumed run draws the same
        batches = self.loader.batches()
        last: dict[str, float] = {}
        first_step = self.step
        try:
            while self.step < cfg.train.max_steps:
                stage = stage_at(cfg, self.step)
                generator.manual_seed((cfg.train.seed * 1_000_003 + self.info.rank) * 1_000_003 + self.step)
                if stage == 2:
                    self._start_stage2()
                t0 = time.perf_counter()
                self.comm.mark()
                sums: dict[str, float] = {"tokens": 0.0, "samples": 0.0}
                parts: list[dict[str, Any]] = []
                bad = False
                data_s = 0.0
                for _ in range(cfg.train.grad_accum):
                    t_data = time.perf_counter()
                    batch = self._to_device(next(batches))
                    data_s += time.perf_counter() - t_data
                    with self._gather_span(stage):  # stage 2 under ZeRO-3: the decoder gathered once
                        out = self._loss(batch, stage, generator)
                        flags = all_reduce([float(not torch.isfinite(out.loss).item()),
                                            float(stop.received is not None)])
                        if not flags[0]:
                            engine.backward(out.loss)
                    if flags[0]:  # every rank skips together (gradients of earlier micro-batches carry over)
                        bad = True
                        break
                    engine.step()
                    parts.append({"loss": float(out.loss.detach()), "ce": float(out.ce.detach()),
                                  "align": float(getattr(out, "align", torch.zeros(())).detach()),
                                  "stats": out.stats})
                    mask = batch.get("attention_mask")
                    sums["tokens"] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
                    sums["samples"] += len(batch["ids"])
                guard.record(bad, self.step)
                if bad:
                    continue
                ema_ms = self.teacher.update() * 1000 if self.teacher is not None else 0.0
                self.step += 1
                last = self.step_metrics(stage, parts, sums, time.perf_counter() - t0, data_s, ema_ms)
                evaluated = self.evals.due(self.step)  # eval/<metric> in this step's row (ilvr/evaluation/periodic.py)
                if evaluated:
                    last.update(self.evals.run(self.step, self.latents.norm, self._fed_mean_all_ranks))
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps or evaluated:
                    self._log(last)
                time_boxed = cfg.train.stop_after and self.step - first_step >= cfg.train.stop_after
                if self.step < cfg.train.max_steps and (flags[1] or time_boxed):  # at the end: finish normally
                    self.save()
                    why = "train.stop_after" if time_boxed else (stop.received or "a signal on another rank")
                    log.warning("stopping after step %d (%s); checkpoint saved, resume with --resume auto",
                                self.step, why)
                    self._finish("KILLED")
                    return last
                if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or self.evals.pending_at(self.step):
                    self.save()  # a new best evaluation (train.keep_best) is saved too
            if self.saved_step != self.step:
                self.save()
            self._refuse_a_diverged_end()
            self._finish("FINISHED")
            self._mark_finished()
            return last
        except BaseException:
            self._finish("FAILED")
            raise
        finally:
            stop.close()

    # ------------------------------------------------------------------ metrics, saving
    def step_metrics(self, stage: int, parts: list, sums: dict, seconds: float, data_s: float, ema_ms: float) -> dict:
        loss = sum(p["loss"] for p in parts) / len(parts)
        tokens, samples, loss_sum = all_reduce([sums["tokens"], sums["samples"], loss], "sum")
        self.losses.add(stage, loss_sum / self.info.world_size)
        m: dict[str, float] = {
            "loss": loss,
            "ce": sum(p["ce"] for p in parts) / len(parts),
            "stage": float(stage),
            "lr": float(self.engine.get_lr()[0]),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "step_s": seconds,
            "data_s": data_s,
            "ema_ms": ema_ms,
            "epoch": float(self.loader.epoch),
        }
        m.update(self._part_lrs())
        if stage == 1:
            m["align"] = sum(p["align"] for p in parts) / len(parts)
        grad_norm = self.engine.get_global_grad_norm()
        self.grad_norm = float(grad_norm) if grad_norm is not None else None
        if grad_norm is not None:
            m["grad_norm"] = float(grad_norm)
        m.update(self.latents.step_metrics(parts, stage))
        m.update(self.comm.step())  # {} unless train.comm_stats
        skipped = summed_over_ranks(self.loader.skips.skipped)  # collective: every rank's data losses, not rank 0's
        if skipped:
            m["skipped"] = float(sum(skipped.values()))  # also on the step line of train.log
        for reason, n in sorted(skipped.items()):
            m[f"skipped/{reason}"] = float(n)
        if torch.cuda.is_available():
            m["mfu"] = self._mfu(tokens / seconds)
        return m

    def _part_lrs(self) -> dict[str, float]:
        """lr/vit, lr/aligner: the vision parts' learning rates when they train (train.vit_lr_mult etc.);
        "lr" is the LM's (the first param group, ilvr/training/param_groups.py)."""
        return {f"lr/{g['name']}": float(g["lr"]) for g in self.engine.optimizer.param_groups
                if g.get("name") in ("vit", "aligner")}

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: 6 x trainable params x tokens/s over the GPUs' bf16 peak (989 TFLOP/s H100)."""
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)
        peak = float(os.environ.get("ILVR_PEAK_TFLOPS", "989")) * 1e12 * self.info.world_size
        return 6 * n * tokens_per_s / peak

    def _log(self, metrics: dict) -> None:
        """metrics.jsonl gets every value (lists too: latent/selected_hist); MLflow takes scalars, so a
        histogram goes there as one fraction per bucket (latent/selected_k1 .. _kK)."""
        self.history.append({"step": self.step, **{k: metrics[k] for k in ("loss", "ce") if k in metrics}})
        if self.info.is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
            log.info("step %d/%d %s %s", self.step, self.cfg.train.max_steps, self._progress(metrics), shown)
            with open(os.path.join(self.cfg.train.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        from ilvr.training.mlflow_store import scalar_metrics

        self.tracker.log_metrics(scalar_metrics(metrics), step=self.step)

    def _progress(self, metrics: dict) -> str:
        """'(40%, eta 3m05s, 12.5 samples/s)': the ETA from each stage's wall time per step since this process's
        first step line (progress.py: stage-2 steps are slower), samples/s over all ranks for this step."""
        from ilvr.training.distributed import format_duration
        from ilvr.training.progress import remaining_steps

        t = self.cfg.train
        self._clock.tick(time.monotonic(), self.step, int(metrics.get("stage", 1)), float(metrics.get("step_s", 0.0)))
        left = self._clock.seconds_left(remaining_steps(t.stage, t.stage1_steps, t.max_steps, self.step))
        return (f"({100 * self.step / t.max_steps:.0f}%, eta {format_duration(left)}, "
                f"{metrics.get('samples_per_s', 0.0):.3g} samples/s)")

    def _fed_mean_all_ranks(self) -> "list[float] | None":
        """The mean fed-back latent state over all ranks (collective; the constant-latent ablation's constant)."""
        from ilvr.model.inputs import hidden_size

        return self.latents.fed_mean_all_ranks(hidden_size(self.engine.module))  # the built model's width

    def save(self) -> str:
        from ilvr.training.health import HEALTH_KEY, verdict, weight_stats

        # collective (ZeRO-3 partitions): judged before the save, recorded in trainer.json (hashed in COMPLETE)
        health = verdict(weight_stats(self.engine.module), self.grad_norm, self.losses, self.cfg.train,
                         loss_scaled=bool(self.ds_config.get("fp16", {}).get("enabled", False)))
        trainer_state = {"stage": stage_at(self.cfg, max(self.step - 1, 0)), "mlflow_run_id": self.run_id,
                         "config": self.cfg.to_dict(), "history": self.history,
                         "latent_ids": list(self.latent_ids.as_tuple()),
                         "latent_norm": self.latents.norm, "fed_mean": self._fed_mean_all_ranks(),
                         HEALTH_KEY: health, "loss_window": self.losses.state()}
        rank_state = {"loader": self.loader.state_dict(), **self.latents.rank_state()}
        best = self.evals.pending_at(self.step)  # train.keep_best: this checkpoint becomes best.json's
        path = self.checkpoints.save(self.engine, self.step, extra_state=trainer_state, rank_state=rank_state,
                                     save_teacher=self._teacher_io("save"), best=best)
        self.evals.saved(self.step, health["healthy"])
        self.saved_step = self.step
        self.last_health = health
        if health["healthy"]:
            log.info("checkpoint saved: %s (healthy: weight RMS %.4g)", path, health["weight_rms"])
        elif self.info.is_main:
            from ilvr.training.checkpoint import latest

            log.warning("checkpoint %s is marked unhealthy: %s. --resume auto and ilvr-export take the newest "
                        "healthy one (%s); it is never pruned", path, "; ".join(health["problems"]),
                        latest(self.cfg.train.output_dir) or "none yet")
        return path

    def _refuse_a_diverged_end(self) -> None:
        """The last checkpoint unhealthy (the same verdict on every rank): the run fails instead of finishing,
        naming what the checks found and the checkpoint that --resume auto and ilvr-export will use."""
        health = getattr(self, "last_health", None)
        if health is None or health["healthy"]:
            return
        from ilvr.training.checkpoint import latest
        from ilvr.training.health import TrainingDiverged

        raise TrainingDiverged(
            f"training diverged: the last checkpoint (step {self.step}) is unhealthy ({'; '.join(health['problems'])}). "
            f"The newest healthy checkpoint is {latest(self.cfg.train.output_dir) or 'none'}: lower train.lr or "
            "raise train.warmup_steps, then resume from it (--resume auto) or start again")

    def _mark_finished(self) -> None:
        """Rank 0 writes <output_dir>/finished.json once train.max_steps is reached: how a job script
        (slurm/train.sh) tells a finished run from a stopped one."""
        if self.info.is_main:
            from ilvr.fileio import write_text_atomic

            write_text_atomic(os.path.join(self.cfg.train.output_dir, FINISHED_FILE),
                              json.dumps({"step": self.step, "max_steps": self.cfg.train.max_steps,
                                          "mlflow_run_id": self.run_id}) + "\n")

    def _finish(self, status: str) -> None:
        if getattr(self, "tracker", None) is None:
            return
        if self.info.is_main and self.history:
            from ilvr.training.loss_curve import plot_loss_curve

            path = plot_loss_curve(self.history, os.path.join(self.cfg.train.output_dir, "loss_curve"))
            if path:
                self.tracker.log_artifact(path)
        self.tracker.end(status)

