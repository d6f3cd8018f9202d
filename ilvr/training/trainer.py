"""The ILVR training loop on DeepSpeed: student engine, momentum teacher, data, checkpoints, tracking.

    Trainer(cfg, ds_config="ds_configs/zero3.json", resume="auto").run()

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
from typing import Any

import torch

from ilvr.config import Config
from ilvr.training.distributed import (
    DistInfo,
    all_reduce,
    dist_info_from_env,
    init_distributed,
    setup_logging,
)
from ilvr.training.faults import BadStepGuard, StopRequest

log = logging.getLogger(__name__)
FINISHED_FILE = "finished.json"  # written when a run reaches train.max_steps (slurm/train.sh reads it)


def stage_at(cfg: Config, step: int) -> int:
    """Which stage optimizer step `step` (0-based) trains."""
    if cfg.train.stage == "1+2":
        return 1 if step < cfg.train.stage1_steps else 2
    return int(cfg.train.stage)


class Trainer:
    def __init__(self, cfg: Config, ds_config: "str | dict", resume: str = "auto"):
        self.cfg = cfg
        self.ds_config_arg = ds_config
        self.resume_arg = resume
        self.step = 0
        self.saved_step = -1
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.info: DistInfo = dist_info_from_env()
        setup_logging(self.info)
        init_distributed(self.info, cfg.train.collective_timeout)
        os.makedirs(cfg.train.output_dir, exist_ok=True)

        from data_pipeline.tiny_processor import load_processor

        self.processor, self.latent_ids = load_processor(cfg.data.processor)
        self.ds_config = self._resolve_ds_config()
        self.engine = self._build_student()
        self.teacher = self._build_teacher() if cfg.train.stage in ("1", "1+2") else None
        self.loader = self._build_loader()
        from ilvr.training.checkpoint import CheckpointManager
        from ilvr.training.tracking import Tracker

        self.checkpoints = CheckpointManager(cfg.train.output_dir, cfg.train.keep_last, processor=self.processor)
        self.tracker = Tracker(rank=self.info.rank, output_dir=cfg.train.output_dir)
        self.run_id = self._resume()
        self.run_id = self.tracker.start(cfg, run_name=os.path.basename(os.path.abspath(cfg.train.output_dir)),
                                         resume_run_id=self.run_id, world_size=self.info.world_size)
        if self.info.is_main:
            cfg.save(os.path.join(cfg.train.output_dir, "config.resolved.yaml"))
            from ilvr.training.ds_config import save_resolved

            save_resolved(self.ds_config, os.path.join(cfg.train.output_dir, "ds_config.resolved.json"))
            self.tracker.log_artifact(os.path.join(cfg.train.output_dir, "config.resolved.yaml"))
            self.tracker.log_artifact(os.path.join(cfg.train.output_dir, "ds_config.resolved.json"))

    def _hidden_size(self) -> int:
        if self.cfg.model.name_or_path == "tiny":
            from ilvr.model.build import TinySize

            return TinySize().hidden
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.cfg.model.name_or_path, local_files_only=True)
        return config.text_config.hidden_size if hasattr(config, "text_config") else config.hidden_size

    def _resolve_ds_config(self) -> dict:
        from ilvr.training.ds_config import describe, resolve_ds_config

        resolved = resolve_ds_config(self.ds_config_arg, self.cfg, self.info.world_size, self._hidden_size())
        log.info("DeepSpeed config (all 'auto' values resolved):\n%s", describe(resolved))
        return resolved

    def _zero3(self) -> bool:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0)) == 3

    def _new_model(self, ds_config: dict):
        """The model, built partitioned under zero.Init for ZeRO-3 (same seed on every rank)."""
        import contextlib

        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from ilvr.model.build import build_model

        self._hf_ds = HfDeepSpeedConfig(ds_config)  # lets from_pretrained partition while loading
        torch.manual_seed(self.cfg.train.seed)
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config) if self._zero3() and \
            self.cfg.model.name_or_path == "tiny" else contextlib.nullcontext()
        with ctx:
            return build_model(self.cfg.model, self.processor.tokenizer, self.processor.image_processor,
                               seed=self.cfg.train.seed)

    def _build_student(self):
        import deepspeed

        model = self._new_model(self.ds_config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config)
        return engine

    def _build_teacher(self):
        from ilvr.training.teacher import MomentumTeacher, teacher_ds_config

        config = teacher_ds_config(self.ds_config)
        return MomentumTeacher(self.engine, self._new_model(config), config, decay=self.cfg.train.ema_decay)

    def _build_loader(self):
        from data_pipeline.pipeline import build_train_loader

        return build_train_loader(self.cfg.data, self.cfg.model.latent_size, self.info.rank, self.info.world_size,
                                  self.processor, self.latent_ids)

    def _resume(self) -> "str | None":
        from ilvr.training.checkpoint import resolve_resume

        path = resolve_resume(self.resume_arg, self.cfg.train.output_dir)
        if path is None:
            return os.environ.get("MLFLOW_RUN_ID")
        if self.teacher is not None and stage_at(self.cfg, int(self._peek_step(path))) == 2:
            self.teacher = None  # the checkpoint is past stage 1: no teacher state to load
        load_teacher = self._teacher_io("load")
        trainer_state, rank_state = self.checkpoints.load(self.engine, path, load_teacher)  # restores RNG too
        self.step = self.saved_step = int(trainer_state["step"])
        self.history = list(trainer_state.get("history", []))
        self.loader.load_state_dict(rank_state["loader"])
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

        module = self.engine.module
        if stage == 1:
            return stage1_loss(module, self.teacher.module, batch, self.cfg.loss, self.cfg.model.latent_size,
                               generator=generator)
        local = [int(batch["latent_segments"][:, 0].bincount().max()) if batch["latent_segments"].numel() else 0]
        s_max = int(all_reduce(local, "max")[0])
        return stage2_loss(module, batch, always_run_vision=True, min_segments=s_max,
                           min_steps=self.cfg.model.latent_size)

    def _release_teacher(self) -> None:
        if self.teacher is not None:
            log.info("stage 2 from step %d on: the momentum teacher is released", self.step + 1)
            self.teacher = None

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
                    self._release_teacher()
                t0 = time.perf_counter()
                sums: dict[str, float] = {"tokens": 0.0, "samples": 0.0}
                parts: list[dict[str, Any]] = []
                bad = False
                data_s = 0.0
                for _ in range(cfg.train.grad_accum):
                    t_data = time.perf_counter()
                    batch = self._to_device(next(batches))
                    data_s += time.perf_counter() - t_data
                    out = self._loss(batch, stage, generator)
                    flags = all_reduce([float(not torch.isfinite(out.loss).item()), float(stop.received is not None)])
                    if flags[0]:  # every rank skips together (gradients of earlier micro-batches carry over)
                        bad = True
                        break
                    engine.backward(out.loss)
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
                last = self._metrics(stage, parts, sums, time.perf_counter() - t0, data_s, ema_ms)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self._log(last)
                time_boxed = cfg.train.stop_after and self.step - first_step >= cfg.train.stop_after
                if self.step < cfg.train.max_steps and (flags[1] or time_boxed):  # at the end: finish normally
                    self.save()
                    why = "train.stop_after" if time_boxed else (stop.received or "a signal on another rank")
                    log.warning("stopping after step %d (%s); checkpoint saved, resume with --resume auto",
                                self.step, why)
                    self._finish("KILLED")
                    return last
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save()
            if self.saved_step != self.step:
                self.save()
            self._finish("FINISHED")
            self._mark_finished()
            return last
        except BaseException:
            self._finish("FAILED")
            raise
        finally:
            stop.close()

    # ------------------------------------------------------------------ metrics, saving
    def _metrics(self, stage: int, parts: list, sums: dict, seconds: float, data_s: float, ema_ms: float) -> dict:
        tokens, samples = all_reduce([sums["tokens"], sums["samples"]], "sum")
        m: dict[str, float] = {
            "loss": sum(p["loss"] for p in parts) / len(parts),
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
        if stage == 1:
            m["align"] = sum(p["align"] for p in parts) / len(parts)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            m["grad_norm"] = float(grad_norm)
        for key, value in parts[-1]["stats"].items():
            if isinstance(value, (int, float)):
                m[f"latent/{key}"] = float(value)
        for reason, n in self.loader.skips.skipped.items():
            m[f"skipped/{reason}"] = float(n)
        if torch.cuda.is_available():
            m["mfu"] = self._mfu(tokens / seconds)
        return m

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: 6 x trainable params x tokens/s over the GPUs' bf16 peak (989 TFLOP/s H100)."""
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)
        peak = float(os.environ.get("ILVR_PEAK_TFLOPS", "989")) * 1e12 * self.info.world_size
        return 6 * n * tokens_per_s / peak

    def _log(self, metrics: dict) -> None:
        self.history.append({"step": self.step, **{k: metrics[k] for k in ("loss", "ce") if k in metrics}})
        if self.info.is_main:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
            log.info("step %d/%d %s", self.step, self.cfg.train.max_steps, shown)
            with open(os.path.join(self.cfg.train.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, step=self.step)

    def save(self) -> str:
        trainer_state = {"stage": stage_at(self.cfg, max(self.step - 1, 0)), "mlflow_run_id": self.run_id,
                         "config": self.cfg.to_dict(), "history": self.history,
                         "latent_ids": list(self.latent_ids.as_tuple())}
        path = self.checkpoints.save(self.engine, self.step, extra_state=trainer_state,
                                     rank_state={"loader": self.loader.state_dict()},
                                     save_teacher=self._teacher_io("save"))
        self.saved_step = self.step
        log.info("checkpoint saved: %s", path)
        return path

    def _mark_finished(self) -> None:
        """Rank 0 writes <output_dir>/finished.json once train.max_steps is reached: how a job script
        (slurm/train.sh) tells a finished run from a stopped one."""
        if self.info.is_main:
            from ilvr.training.checkpoint import write_text_atomic

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

