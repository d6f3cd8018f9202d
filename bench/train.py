"""Training-side cost of ILVR on DeepSpeed ZeRO-3, on 2 gloo ranks on CPU: EMA teacher, memory, step breakdown.

    python -m bench.train [--parts 1,2,3,4] [--samples 128] [--ema-repeats 15] [--big-steps 3] [--steps 10] [--json PATH]

The script writes synthetic VSP shards and a tiny processor to a temporary directory, then
starts 2 gloo ranks itself (torch.multiprocessing spawn, 1 torch thread each) that build the
student and the momentum teacher exactly as `Trainer` does (recipe configs/tiny_cpu.yaml,
DeepSpeed config ds_configs/zero3.json with every "auto" resolved by `resolve_ds_config`,
model built under `deepspeed.zero.Init`, vision frozen, teacher = `MomentumTeacher`), and
measures, side by side in one run:

1. The EMA step of the momentum teacher under ZeRO-3, on a random-init Qwen2.5-VL big enough
   to matter on CPU (default TinySize(hidden=512, intermediate=1376, layers=8, heads=8,
   kv_heads=4): ~25 M parameters), both at the resolved default persistence threshold
   (zero3.json "auto" = 10 x hidden):
   * ours: `MomentumTeacher.update()`: each rank updates its own partitions (fp32 buffers,
     `torch._foreach` ops), no communication;
   * reference: the usual way: gather the student's (read only) and the teacher's full weights
     with `deepspeed.zero.GatheredParameters` (teacher: modifier_rank=0), EMA on the full
     tensors on rank 0, written back by DeepSpeed (broadcast + re-partition). Only the
     trainable pairs are updated (the frozen vision tower is not gathered), which is the
     cheapest form of the reference.
   Each update is timed on both ranks after a barrier; an iteration costs the slower rank,
   and the median over interleaved repeats (ours, reference, ours, ...) is reported with the
   ratio (target >= 20x). A few full stage-1 training steps of the same model (data, student
   forward+backward with teacher targets, optimizer step, EMA) give the EMA's share of a step
   (target <= 1%). Both updates start from the same teacher and student; the gathered
   teacher weights must agree (max |diff| printed), and the c10d collectives each issues are
   counted. The reference frees the resident full copies of persistent parameters on its way
   out (GatheredParameters re-partitions everything it gathered); the next training forward
   would fetch them again, so after each reference call the ones that were resident after the
   training steps are re-gathered untimed, which leaves ours the state it has in training.
2. Memory per rank of the teacher on the same model: bytes of its local partitions
   (`ds_tensor`, padding included), of the full copies of persistent parameters, and of its
   fp32 EMA buffers, beside params x (2+4) / world_size (the claim for bf16 training: bf16
   shard + fp32 EMA shard), params x (4+4) / world_size (this fp32 run) and params x 4 (one
   full fp32 replica of the teacher alone), and how many persistent parameters of teacher and
   student have a resident full copy. Process RSS growth while the teacher is built and
   the peak RSS of each rank (`resource.getrusage`) are printed for context.
3. A step-time breakdown for the tiny recipe itself (configs/tiny_cpu.yaml: default TinySize,
   batch 4, K=4, stage 1), over `--steps` steps after `--warmup` steps: data (loader next),
   student forward+backward (stage-1 loss, teacher targets included), the NaN-check
   all_reduce, optimizer step, EMA; plus the teacher selection alone (an extra
   `select_targets` call on the same batch, not counted in the step: it is part of the
   forward). Medians per rank and shares of the median step.

4. Stage 2 vs stage 1 (`--parts 4`), on the tiny recipe and on the part-1 model, on the same
   batches: ZeRO-3 with DeepSpeed's per-call gathering, ZeRO-3 with `train.gather_once` (the
   teacher's pass and each stage-2 forward + backward gather once, ilvr/training/gather.py),
   ZeRO-2, and on the bigger model stage 2 with per-call activation checkpointing. Per variant:
   step time (slower rank, median), all-gather calls and gathered bytes and reduce-scatter bytes
   (DeepSpeed's comms logger), activation memory (bytes autograd saves for backward), the full
   parameters gather_once holds, and the step's RSS peak; then the ratios the targets are about.

Why: the shard-local EMA is advertised as free next to a training step and as costing
(2+4) bytes x params / world_size per rank; this shows both on 2 ranks, and where a step's
time goes. Data loading runs in the main process by default (`--num-workers 0`): with 2 ranks
on 2 cores, loader workers would only compete with the compute, and "data" would show a wait
rather than the cost. Timings on a shared machine vary; the ratios are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ilvr.training.spawn import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny_cpu.yaml"
DS_CONFIG = REPO / "ds_configs" / "zero3.json"
EMA_RATIO_TARGET = 20.0
EMA_SHARE_TARGET = 0.01
WORLD_SIZE = 2
SAMPLES_PER_SHARD = 32
STEP_PARTS = ("data", "forward_backward", "nan_check", "optimizer", "ema")


# ----------------------------------------------------------------------------- data (parent process)


def prepare_data(workdir: str, n_samples: int, seed: int, max_size: int) -> tuple[str, str]:
    """Synthetic VSP shards (the ilvr-prepare write path) and a tiny processor trained on their text."""
    from data_pipeline.records import IMAGE_PLACEHOLDER, RecordError, record_to_sample
    from data_pipeline.shards import ShardWriter
    from data_pipeline.sources.synthetic_vsp import read as synthetic
    from data_pipeline.tiny_processor import build_tiny_processor

    shards = os.path.join(workdir, "shards")
    writer = ShardWriter(shards, prefix="train", samples_per_shard=SAMPLES_PER_SHARD, source="bench:synthetic")
    texts = []
    for i, record in enumerate(synthetic(num_samples=n_samples, seed=seed, max_size=max_size)):
        if isinstance(record, RecordError):
            continue
        writer.write(record_to_sample(record, i))
        texts.append(record.question.replace(IMAGE_PLACEHOLDER, " "))
        texts += [s.text for s in record.steps if s.kind == "text"]
    writer.close()
    processor = build_tiny_processor(os.path.join(workdir, "processor"), texts)
    return shards, processor


# ----------------------------------------------------------------------------- rank side: building


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def recipe(opts: dict):
    """configs/tiny_cpu.yaml pointed at this run's shards and processor."""
    from ilvr.config import load_config

    return load_config(str(RECIPE), [
        f"data.train_shards={opts['shards']}", "data.eval_shards=", f"data.processor={opts['processor']}",
        f"data.num_workers={opts['num_workers']}", f"data.batch_size={opts['batch_size']}",
        f"model.latent_size={opts['latent_size']}", f"train.output_dir={opts['workdir']}/out",
    ])


def build(cfg, processor, size, world_size: int, threshold: int | None, zero_stage: int = 3,
          comms_logger: bool = False):
    """Student engine and MomentumTeacher as `Trainer` builds them (zero.Init under ZeRO-3, same seed,
    vision frozen). Returns (engine, teacher, resolved DeepSpeed config, RSS before / after the teacher)."""
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from ilvr.model.build import build_model
    from ilvr.training.ds_config import resolve_ds_config
    from ilvr.training.teacher import MomentumTeacher, teacher_ds_config

    ds = resolve_ds_config(str(DS_CONFIG if zero_stage == 3 else REPO / "ds_configs" / "zero2.json"), cfg,
                           world_size, size.hidden)
    if threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    if comms_logger:
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    keep = []  # HfDeepSpeedConfig is held through a weak reference: keep it alive while models are built

    def new_model(config: dict):
        keep.append(HfDeepSpeedConfig(config))
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, processor.tokenizer, processor.image_processor, tiny_size=size,
                           seed=cfg.train.seed, zero3_config=config if zero_stage == 3 else None)

    model = new_model(ds)
    model.train()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    rss_before = current_rss()
    tcfg = teacher_ds_config(ds)
    teacher = MomentumTeacher(engine, new_model(tcfg), tcfg, decay=cfg.train.ema_decay)
    return engine, teacher, ds, (rss_before, current_rss())


def loader_batches(cfg, processor, latent_ids, rank: int, world_size: int):
    from data_pipeline.pipeline import build_train_loader

    loader = build_train_loader(cfg.data, cfg.model.latent_size, rank, world_size, processor, latent_ids)
    return loader.batches()


# ----------------------------------------------------------------------------- rank side: timing


def train_step(engine, teacher, batches, cfg, generator, seed: int, select: bool = False) -> dict[str, float]:
    """One stage-1 optimizer step as `Trainer.run` makes it (grad_accum 1), each part timed in seconds.

    `select`: also time one extra teacher selection on the batch (not part of the step)."""
    import torch

    from ilvr.model.selection import select_targets
    from ilvr.model.stage1 import stage1_loss
    from ilvr.training.distributed import all_reduce

    k = cfg.model.latent_size
    generator.manual_seed(seed)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    batch = {key: v.to(engine.device) if torch.is_tensor(v) else v for key, v in next(batches).items()}
    t["data"] = time.perf_counter() - t0
    if select:
        s0 = time.perf_counter()
        select_targets(teacher.module, batch, cfg.loss, k)
        t["selection"] = time.perf_counter() - s0
    t1 = time.perf_counter()
    out = stage1_loss(engine.module, teacher.module, batch, cfg.loss, k, generator=generator)
    engine.backward(out.loss)
    t2 = time.perf_counter()
    all_reduce([float(not torch.isfinite(out.loss).item()), 0.0])
    t3 = time.perf_counter()
    engine.step()
    t4 = time.perf_counter()
    teacher.update()
    t5 = time.perf_counter()
    t.update(forward_backward=t2 - t1, nan_check=t3 - t2, optimizer=t4 - t3, ema=t5 - t4)
    t["step"] = sum(t[p] for p in STEP_PARTS)
    t["loss"] = float(out.loss.detach())
    return t


def trainable_pairs(engine, teacher) -> tuple[list, list]:
    s = dict(engine.module.named_parameters())
    t = dict(teacher.module.named_parameters())
    names = [n for n, p in s.items() if p.requires_grad]
    return [t[n] for n in names], [s[n] for n in names]


def reference_ema(engine, teacher, decay: float) -> None:
    """The usual ZeRO-3 EMA: gather full weights (student read only, teacher for modification on rank 0),
    EMA on the full tensors on rank 0; DeepSpeed broadcasts and re-partitions the teacher on exit."""
    import deepspeed
    import torch

    t_params, s_params = trainable_pairs(engine, teacher)
    with deepspeed.zero.GatheredParameters(s_params, modifier_rank=None), \
            deepspeed.zero.GatheredParameters(t_params, modifier_rank=0), torch.no_grad():
        if torch.distributed.get_rank() == 0:
            torch._foreach_mul_(t_params, decay)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)


def resident_persistent(*modules) -> list:
    """The persistent parameters of `modules` whose full copy is resident now."""
    from ilvr.training.teacher import materialised

    return [p for m in modules for p in m.parameters() if hasattr(p, "ds_id") and p.ds_persist and materialised(p)]


def rematerialise(params: list) -> int:
    """Gather those of `params` that are no longer resident (GatheredParameters freed them), as the next training
    forward would, and leave them resident. Collective: every rank calls it. Returns how many."""
    from ilvr.training.teacher import materialised

    missing = [p for p in params if not materialised(p)]
    if missing:
        missing[0].all_gather(param_list=missing)
    return len(missing)


def count_collectives(fn) -> int:
    """How many c10d (gloo) collectives `fn()` issues (profiler events; kineto's stderr chatter is dropped)."""
    import torch

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as devnull:
            os.dup2(devnull.fileno(), 2)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return sum(1 for e in prof.events() if e.name.startswith("gloo:"))


def timed(fn) -> float:
    """Seconds `fn()` takes on this rank, started after a barrier so that both ranks start together."""
    import torch

    torch.distributed.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def teacher_memory(teacher, world_size: int) -> dict[str, Any]:
    """Bytes this rank holds for the teacher: local partitions, resident full copies, fp32 EMA buffers."""
    from ilvr.training.teacher import materialised

    shard = full_copies = unpartitioned = n_params = n_persistent = persistent = resident = 0
    for p in teacher.module.parameters():
        n_params += getattr(p, "ds_numel", p.numel())
        if hasattr(p, "ds_id"):
            shard += p.ds_tensor.numel() * p.ds_tensor.element_size()
            if p.ds_persist:
                n_persistent += p.ds_numel
                persistent += 1
            if p.ds_persist and materialised(p):
                full_copies += p.data.numel() * p.data.element_size()
                resident += 1
        else:
            unpartitioned += p.numel() * p.element_size()
    buffers = teacher.state_dict()
    ema = sum(b.numel() * b.element_size() for b in buffers.values())
    ema_numel = sum(b.numel() for b in buffers.values())
    return {"params": n_params, "persistent_params": n_persistent, "ema_numel": ema_numel,
            "teacher_persistent": persistent, "teacher_persistent_resident": resident,
            "partition_bytes": shard, "persistent_full_copy_bytes": full_copies, "unpartitioned_bytes": unpartitioned,
            "ema_buffer_bytes": ema, "total_bytes": shard + full_copies + unpartitioned + ema,
            "claim_bf16_bytes": n_params * (2 + 4) / world_size, "expected_fp32_bytes": n_params * (4 + 4) / world_size,
            "full_replica_fp32_bytes": n_params * 4}


def bench_ema(cfg, processor, latent_ids, size, opts: dict, rank: int, world_size: int) -> dict[str, Any]:
    """Part 1 (EMA ours vs reference, EMA share of a step) and part 2 (teacher memory) on the big model."""
    import gc

    import torch

    engine, teacher, ds, (rss_before, rss_after) = build(cfg, processor, size, world_size, opts["threshold"])
    threshold = ds["zero_optimization"]["stage3_param_persistence_threshold"]
    batches = loader_batches(cfg, processor, latent_ids, rank, world_size)
    generator = torch.Generator()
    steps = []
    for i in range(opts["big_warmup"] + opts["big_steps"]):
        t = train_step(engine, teacher, batches, cfg, generator, seed=1000 * rank + i)
        if i >= opts["big_warmup"]:
            steps.append(t)
    memory = teacher_memory(teacher, world_size)  # steady state, as in training
    resident = resident_persistent(engine.module, teacher.module)  # the reference frees these; ours needs them
    memory["student_persistent_resident"] = len(resident_persistent(engine.module))
    memory["student_persistent"] = sum(1 for p in engine.module.parameters() if getattr(p, "ds_persist", False))
    memory.update(rss_before_teacher=rss_before, rss_after_teacher=rss_after, peak_rss=peak_rss())

    # same start for both: teacher T0 (buffers saved), student S; compare the gathered teacher weights
    decay = teacher.decay
    saved = {n: b.clone() for n, b in teacher.state_dict().items()}
    before = teacher.gathered_state_dict()
    ours_collectives = count_collectives(teacher.update)
    ours = teacher.gathered_state_dict()
    teacher.load_state_dict(saved)
    ref_collectives = count_collectives(lambda: reference_ema(engine, teacher, decay))
    reference = teacher.gathered_state_dict()
    refetched = rematerialise(resident)
    max_diff = max(float((ours[n] - reference[n]).abs().max()) for n in ours)
    moved = max(float((ours[n] - before[n]).abs().max()) for n in ours)
    del before, ours, reference
    gc.collect()

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(opts["ema_repeats"]):
        times["ours"].append(timed(teacher.update))
        times["reference"].append(timed(lambda: reference_ema(engine, teacher, decay)))
        rematerialise(resident)  # untimed: what the next training forward would do
    teacher.load_state_dict(saved)
    t_params, _ = trainable_pairs(engine, teacher)
    result = {
        "threshold": threshold, "decay": decay, "params": memory["params"], "trainable": sum(p.ds_numel for p in t_params),
        "persistent_params": memory["persistent_params"], "steps": steps, "times": times,
        "ours_collectives": ours_collectives, "reference_collectives": ref_collectives,
        "persistent_refetched_after_reference": refetched, "max_abs_diff": max_diff, "ema_moved": moved,
    }
    return {"ema": result, "memory": memory}


def bench_breakdown(cfg, processor, latent_ids, size, opts: dict, rank: int, world_size: int) -> dict[str, Any]:
    """Part 3: the tiny recipe's step, part by part."""
    import torch

    engine, teacher, ds, _ = build(cfg, processor, size, world_size, None)
    batches = loader_batches(cfg, processor, latent_ids, rank, world_size)
    generator = torch.Generator()
    steps = []
    for i in range(opts["warmup"] + opts["steps"]):
        t = train_step(engine, teacher, batches, cfg, generator, seed=2000 * rank + i, select=True)
        if i >= opts["warmup"]:
            steps.append(t)
    params = sum(p.ds_numel for p in engine.module.parameters())
    trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
    return {"steps": steps, "params": params, "trainable": trainable,
            "threshold": ds["zero_optimization"]["stage3_param_persistence_threshold"]}


# ----------------------------------------------------------------------------- rank side: stage 2 vs stage 1


class PeakRss:
    """Peak RSS of this process while the block runs, above its RSS on entry (a sampling thread, 2 ms):
    the kernel's own peak counter cannot be reset here, and torch's CPU allocator keeps no statistics."""

    def __init__(self):
        import threading

        self.base = self.peak = current_rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, current_rss() or 0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss() or 0)

    @property
    def growth(self) -> int:
        return self.peak - self.base


class SavedForBackward:
    """Bytes autograd keeps for the backward pass (each storage once): the activation memory of a step,
    deterministic where RSS is not (the allocator keeps what earlier variants freed)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t):
        import torch

        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def stage_step(engine, teacher, batch, cfg, generator, stage: int, gather_once: bool, checkpoint: bool,
               saved: "SavedForBackward | None" = None) -> float:
    """One optimizer step of `stage` as `Trainer` makes it (grad_accum 1); seconds on this rank."""
    import torch

    from ilvr.model.selection import select_targets
    from ilvr.model.stage1 import stage1_loss
    from ilvr.model.stage2 import stage2_loss
    from ilvr.training.distributed import all_reduce
    from ilvr.training.gather import held

    k = cfg.model.latent_size
    torch.distributed.barrier()
    t0 = time.perf_counter()
    import contextlib

    saving = (torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if saved is not None
              else contextlib.nullcontext())
    if stage == 1:
        with held(teacher.module.model, gather_once):
            selection = select_targets(teacher.module, batch, cfg.loss, k)
        with saving:
            out = stage1_loss(engine.module, teacher.module, batch, cfg.loss, k, generator=generator,
                              selection=selection)
        engine.backward(out.loss)
    else:
        local = [int(batch["latent_segments"][:, 0].bincount().max()) if batch["latent_segments"].numel() else 0]
        s_max = int(all_reduce(local, "max")[0])
        with held(engine.module, gather_once):
            with saving:
                out = stage2_loss(engine.module, batch, always_run_vision=True, min_segments=s_max, min_steps=k,
                                  checkpoint_calls=checkpoint)
            engine.backward(out.loss)
    engine.step()
    if stage == 1:
        teacher.update()
    return time.perf_counter() - t0


def bench_stages(cfg, processor, latent_ids, size, opts: dict, rank: int, world_size: int, label: str) -> dict:
    """Stage 1 and stage 2 steps of one model under ZeRO-3 (DeepSpeed's per-call gathering, and
    train.gather_once) and ZeRO-2, on the same batches: time (slower rank), collective calls and bytes
    (DeepSpeed's comms logger), peak RSS per rank."""
    import gc

    import torch
    from deepspeed import comm

    from ilvr.training.comm_stats import CommStats

    variants = [("zero3", 3, 1, False), ("zero3", 3, 2, False), ("zero3", 3, 1, True), ("zero3", 3, 2, True),
                ("zero2", 2, 1, False), ("zero2", 2, 2, False)]
    if opts.get("checkpoint_variant"):
        variants.append(("zero3", 3, 2, "ckpt"))
    batches = [b for _, b in zip(range(opts["stage_steps"] + 1), loader_batches(cfg, processor, latent_ids, rank,
                                                                                  world_size))]
    batches = [{k: v.to("cpu") if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    results = []
    built: dict = {}
    for zname, zstage, stage, once in variants:
        if zname not in built:
            built.clear()
            gc.collect()
            built[zname] = build(cfg, processor, size, world_size, None, zero_stage=zstage, comms_logger=True)
        engine, teacher, _, _ = built[zname]
        stats = CommStats(world_size)
        generator = torch.Generator()
        times, counts, peaks, saved_bytes = [], [], [], []
        for i, batch in enumerate(batches):
            stats.mark()
            gc.collect()
            saved = SavedForBackward()
            with PeakRss() as mem:
                seconds = stage_step(engine, teacher, batch, cfg, generator, stage, bool(once) and zstage == 3,
                                     checkpoint=once == "ckpt", saved=saved)
            c = stats.step()
            if i:  # the first step warms up
                times.append(seconds)
                counts.append(c)
                peaks.append(mem.growth)
                saved_bytes.append(saved.bytes)
        comm.comms_logger.comms_dict.clear()
        mean = {k: sum(c.get(k, 0.0) for c in counts) / len(counts) for k in counts[0]}
        held_bytes = sum(p.ds_numel * p.element_size() for p in engine.module.parameters()) \
            if zstage == 3 and once and stage == 2 else 0
        results.append({"zero": zname, "stage": stage, "gather_once": once, "times": times, "comm": mean,
                        "peak_rss": max(peaks), "saved_for_backward": max(saved_bytes), "held_param_bytes": held_bytes})
    built.clear()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    return {"label": label, "params": params, "param_bytes": params * 4, "variants": results}


def rank_main_stages(rank: int, world_size: int, opts: dict) -> dict[str, Any]:
    import logging

    import deepspeed
    import torch

    torch.set_num_threads(opts["threads"])
    deepspeed.init_distributed(dist_backend="gloo")
    logging.basicConfig(level=logging.WARNING, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from data_pipeline.tiny_processor import load_processor
    from ilvr.model.build import TinySize

    cfg = recipe(opts)
    processor, latent_ids = load_processor(cfg.data.processor)
    out = {"tiny": bench_stages(cfg, processor, latent_ids, TinySize(), opts, rank, world_size, "tiny recipe")}
    if opts["stage_big"]:
        big = TinySize(hidden=opts["hidden"], intermediate=opts["intermediate"], layers=opts["layers"],
                       heads=opts["heads"], kv_heads=opts["kv_heads"])
        out["big"] = bench_stages(cfg, processor, latent_ids, big, dict(opts, checkpoint_variant=True), rank,
                                  world_size, "bigger model")
    return out


def report_stages(results: list[dict]) -> dict[str, Any]:
    print(f"\n4. Stage 2 vs stage 1 under ZeRO-3 and ZeRO-2 ({WORLD_SIZE} gloo ranks, same batches; DeepSpeed's "
          "comms logger; bytes = gathered tensor sizes; time = slower rank, median; activations = bytes autograd "
          "saved for backward (rank 0); held params = the full parameters gather_once keeps for the step; RSS peak "
          "above the step's start, per rank: the allocator reuses freed memory, so read it with care)")
    summary = {}
    for key in results[0]:
        model = results[0][key]
        print(f"  {model['label']}: {model['params'] / 1e6:.2f} M params ({mib(model['param_bytes']).strip()} fp32)")
        print(f"  {'variant':<34}{'step s':>8}{'gathers':>9}{'gathered':>12}{'x model':>8}{'red.-scat.':>12}"
              f"{'activations':>13}{'held params':>13}{'step RSS peak r0 / r1':>24}")
        rows = []
        for i, v in enumerate(model["variants"]):
            step = statistics.median(slowest([r[key]["variants"][i]["times"] for r in results]))
            c = v["comm"]
            once = {False: "per call", True: "gather once", "ckpt": "gather once + ckpt"}[v["gather_once"]]
            name = f"{v['zero']} stage {v['stage']}" + (f" ({once})" if v["zero"] == "zero3" else "")
            rss = " / ".join(mib(r[key]["variants"][i]["peak_rss"]).strip() for r in results)
            print(f"  {name:<34}{step:8.2f}{c.get('comm/all_gather_calls', 0):9.0f}"
                  f"{mib(c.get('comm/all_gather_bytes', 0)):>12}{c.get('comm/all_gather_bytes', 0) / model['param_bytes']:8.2f}"
                  f"{mib(c.get('comm/reduce_scatter_bytes', 0)):>12}{mib(v['saved_for_backward']):>13}"
                  f"{mib(v['held_param_bytes']):>13}{rss:>24}")
            rows.append({"variant": name, "step_s": step, **c, "saved_for_backward": v["saved_for_backward"],
                         "held_param_bytes": v["held_param_bytes"],
                         "peak_rss": [r[key]["variants"][i]["peak_rss"] for r in results]})
        by = {r["variant"]: r for r in rows}

        def ratio(a, b, what):
            return by[a][what] / by[b][what] if by[b][what] else float("nan")

        s1, s2 = "zero3 stage 1 (gather once)", "zero3 stage 2 (gather once)"
        s2_call, z2s2 = "zero3 stage 2 (per call)", "zero2 stage 2"
        lines = {
            "stage-2 / stage-1 gathered bytes (zero3, gather once; target <= 1.5)": ratio(s2, s1, "comm/all_gather_bytes"),
            "stage-2 / stage-1 step time (zero3, gather once; target <= 1.5)": ratio(s2, s1, "step_s"),
            "zero3 / zero2 stage-2 step time (gather once; target <= 1.3)": ratio(s2, z2s2, "step_s"),
            "stage-2 gathered bytes, per call / gather once": ratio(s2_call, s2, "comm/all_gather_bytes"),
            "stage-2 step time, per call / gather once": ratio(s2_call, s2, "step_s"),
        }
        for text, value in lines.items():
            print(f"  {text:<72}{value:6.2f}x")
        summary[key] = {"rows": rows, "ratios": lines}
    return summary


def rank_main(rank: int, world_size: int, opts: dict) -> dict[str, Any]:
    import gc
    import logging

    import deepspeed  # sets its logger's level on import; quieten it afterwards
    import torch

    torch.set_num_threads(opts["threads"])
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer on the group run_on_ranks started
    logging.basicConfig(level=logging.WARNING, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):  # DeepSpeed warns about lr before step 1
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from data_pipeline.tiny_processor import load_processor
    from ilvr.model.build import TinySize

    cfg = recipe(opts)
    processor, latent_ids = load_processor(cfg.data.processor)
    big = TinySize(hidden=opts["hidden"], intermediate=opts["intermediate"], layers=opts["layers"],
                   heads=opts["heads"], kv_heads=opts["kv_heads"])
    out = bench_ema(cfg, processor, latent_ids, big, opts, rank, world_size)
    gc.collect()  # the part-1 engines are gone with bench_ema's frame
    out["breakdown"] = bench_breakdown(cfg, processor, latent_ids, TinySize(), opts, rank, world_size)
    out["peak_rss_end"] = peak_rss()
    return out


# ----------------------------------------------------------------------------- report (parent)


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Per iteration, the time of the slower rank (a step costs what its slowest rank takes)."""
    return [max(ts) for ts in zip(*per_rank)]


def ms(seconds: float) -> float:
    return seconds * 1e3


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def report(results: list[dict], args, wall_s: float) -> dict[str, Any]:
    ema = [r["ema"] for r in results]
    e0 = ema[0]
    ours = slowest([e["times"]["ours"] for e in ema])
    ref = slowest([e["times"]["reference"] for e in ema])
    ours_ms, ref_ms = ms(statistics.median(ours)), ms(statistics.median(ref))
    big_step = slowest([[s["step"] for s in e["steps"]] for e in ema])
    big_ema = slowest([[s["ema"] for s in e["steps"]] for e in ema])
    step_ms, in_step_ema_ms = ms(statistics.median(big_step)), ms(statistics.median(big_ema))
    ratio, share = ref_ms / ours_ms, ours_ms / step_ms
    max_diff = max(e["max_abs_diff"] for e in ema)

    print(f"\n1. EMA step of the momentum teacher, ZeRO-3 on {WORLD_SIZE} gloo ranks")
    print(f"  model: random-init Qwen2.5-VL hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads ({args.kv_heads} KV), fp32: {e0['params'] / 1e6:.2f} M params, "
          f"{e0['trainable'] / 1e6:.2f} M trainable (EMA'd)")
    print(f"  stage3_param_persistence_threshold = {e0['threshold']} ({e0['persistent_params'] / 1e3:.1f} k elements "
          f"persistent); decay {e0['decay']}; {args.ema_repeats} interleaved repeats, slower rank per repeat")
    print(f"  {'ours: MomentumTeacher.update()':<46} {ours_ms:9.1f} ms  (min {ms(min(ours)):.1f}, "
          f"max {ms(max(ours)):.1f})  collectives: {e0['ours_collectives']}")
    print(f"  {'reference: GatheredParameters + full-tensor EMA':<46} {ref_ms:9.1f} ms  (min {ms(min(ref)):.1f}, "
          f"max {ms(max(ref)):.1f})  collectives: {e0['reference_collectives']}")
    print(f"  reference / ours = {ratio:.1f}x  ({'meets' if ratio >= EMA_RATIO_TARGET else 'MISSES'} the "
          f">= {EMA_RATIO_TARGET:.0f}x target)")
    print(f"  same teacher weights: max |ours - reference| = {max_diff:.2e} (the update moved weights by up to "
          f"{max(e['ema_moved'] for e in ema):.2e}); resident persistent params the reference freed "
          f"(re-gathered untimed): {e0['persistent_refetched_after_reference']}")
    print(f"  full training step of this model (stage 1, batch {args.batch_size}, K={args.latent_size}; median of "
          f"{args.big_steps}): {step_ms:.0f} ms, EMA inside it {in_step_ema_ms:.1f} ms")
    print(f"  EMA / step = {100 * share:.2f}%  ({'meets' if share <= EMA_SHARE_TARGET else 'MISSES'} the "
          f"<= {100 * EMA_SHARE_TARGET:.0f}% target); the reference would be {100 * ref_ms / step_ms:.1f}%")

    print("\n2. Teacher memory per rank (same model, fp32, after the training steps)")
    mems = [r["memory"] for r in results]
    header = "".join(f"{f'rank {i}':>14}" for i in range(len(mems)))
    print(f"  {'':<52}{header}")
    rows = [("local partitions (ds_tensor, padded)", "partition_bytes"),
            ("resident full copies of persistent params", "persistent_full_copy_bytes"),
            ("fp32 EMA buffers", "ema_buffer_bytes"), ("teacher total", "total_bytes")]
    for label, key in rows:
        print(f"  {label:<52}" + "".join(f"{mib(m[key]):>14}" for m in mems))
    m0 = mems[0]
    p = m0["params"]
    print(f"  {'claim, bf16 training: params x (2+4) / world_size':<52}{mib(m0['claim_bf16_bytes']):>14}")
    print(f"  {'this run, fp32: params x (4+4) / world_size':<52}{mib(m0['expected_fp32_bytes']):>14}")
    print(f"  {'one full fp32 replica of the teacher: params x 4':<52}{mib(m0['full_replica_fp32_bytes']):>14}")
    bf16 = [m["partition_bytes"] / 2 + m["persistent_full_copy_bytes"] / 2 + m["ema_buffer_bytes"] for m in mems]
    print(f"  {'measured numels at bf16 (shards x 2 + EMA x 4)':<52}" + "".join(f"{mib(b):>14}" for b in bf16))
    print(f"  params {p / 1e6:.2f} M (EMA buffers cover the {m0['ema_numel'] / 1e6:.2f} M trainable elements of this "
          f"rank's shards + persistent params; the frozen vision tower has none)")
    print(f"  persistent parameters with a resident full copy: teacher {m0['teacher_persistent_resident']} of "
          f"{m0['teacher_persistent']}, student {m0['student_persistent_resident']} of {m0['student_persistent']}")
    print(f"  {'RSS growth while building the teacher':<52}" + "".join(
        f"{mib(m['rss_after_teacher'] - m['rss_before_teacher']) if m['rss_before_teacher'] else 'n/a':>14}"
        for m in mems))
    print(f"  {'peak RSS after part 1 (getrusage)':<52}" + "".join(f"{mib(m['peak_rss']):>14}" for m in mems))
    print(f"  {'peak RSS at the end':<52}" + "".join(f"{mib(r['peak_rss_end']):>14}" for r in results))

    bd = [r["breakdown"] for r in results]
    print(f"\n3. Step breakdown, tiny recipe (configs/tiny_cpu.yaml: {bd[0]['params'] / 1e6:.2f} M params, "
          f"{bd[0]['trainable'] / 1e6:.2f} M trainable; batch {args.batch_size}, K={args.latent_size}, stage 1, "
          f"{args.num_workers} loader workers)")
    print(f"  median of {args.steps} steps after {args.warmup} warm-up, per rank; share = of that rank's median step")
    print(f"  {'':<44}" + "".join(f"{f'rank {i} ms':>12}{'share':>8}" for i in range(len(bd))))
    labels = {"data": "data (loader next)", "forward_backward": "student forward+backward (stage-1 loss)",
              "selection": "  of which teacher selection (timed alone)", "nan_check": "NaN-check all_reduce",
              "optimizer": "optimizer step", "ema": "EMA (MomentumTeacher.update)", "step": "step total"}
    table = {}
    for key, label in labels.items():
        meds = [statistics.median(s[key] for s in b["steps"]) for b in bd]
        steps = [statistics.median(s["step"] for s in b["steps"]) for b in bd]
        table[key] = [ms(m) for m in meds]
        print(f"  {label:<44}" + "".join(f"{ms(m):12.1f}{100 * m / st:7.1f}%" for m, st in zip(meds, steps)))
    losses = " ".join(f"{s['loss']:.3f}" for s in bd[0]["steps"])
    print(f"  loss over the timed steps (rank 0): {losses}")
    print(f"\n  total wall time {wall_s:.0f} s")
    return {"ema": {"ours_ms": ours_ms, "reference_ms": ref_ms, "ratio": ratio, "target_ratio": EMA_RATIO_TARGET,
                    "meets_ratio": ratio >= EMA_RATIO_TARGET, "step_ms": step_ms, "ema_share_of_step": share,
                    "target_share": EMA_SHARE_TARGET, "meets_share": share <= EMA_SHARE_TARGET,
                    "max_abs_diff": max_diff, "per_rank": ema},
            "memory": {"per_rank": mems}, "breakdown": {"median_ms_per_rank": table, "per_rank": bd}}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ILVR training cost on DeepSpeed ZeRO-3 (2 gloo ranks, CPU): EMA teacher "
                                            "ours vs gather-based, teacher memory per rank, step breakdown.")
    p.add_argument("--hidden", type=int, default=512, help="part 1-2 model: LLM hidden size")
    p.add_argument("--intermediate", type=int, default=1376, help="part 1-2 model: LLM MLP size")
    p.add_argument("--layers", type=int, default=8, help="part 1-2 model: decoder layers")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--threshold", type=int, default=None, help="stage3_param_persistence_threshold for part 1-2 "
                   "(default: zero3.json's 'auto' = 10 x hidden)")
    p.add_argument("--ema-repeats", type=int, default=15, help="timed EMA updates per variant (interleaved)")
    p.add_argument("--big-warmup", type=int, default=1, help="untimed training steps of the part-1 model")
    p.add_argument("--big-steps", type=int, default=3, help="timed training steps of the part-1 model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of the tiny recipe (part 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of the tiny recipe (part 3)")
    p.add_argument("--batch-size", type=int, default=4, help="per-rank micro-batch (the recipe's 4)")
    p.add_argument("--latent-size", type=int, default=4, help="K (the recipe's 4)")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers per rank (0: in the main process)")
    p.add_argument("--samples", type=int, default=128, help="synthetic VSP records written to the shards")
    p.add_argument("--max-map-size", type=int, default=6, help="largest map side (the quick start's 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks share the cores)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the ranks are given up")
    p.add_argument("--parts", default="1,2,3,4", help="which parts to run (1-3: EMA, memory, breakdown; 4: stage 2 vs "
                   "stage 1 under ZeRO-3 and ZeRO-2)")
    p.add_argument("--stage-steps", type=int, default=3, help="part 4: timed steps per variant (after 1 warm-up)")
    p.add_argument("--no-stage-big", dest="stage_big", action="store_false",
                   help="part 4: only the tiny recipe (default: also the part 1-2 model)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    print("ILVR training bench (DeepSpeed ZeRO-3, CPU, gloo)")
    print(f"  torch {torch.__version__}, {WORLD_SIZE} ranks x {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        shards, processor = prepare_data(workdir, args.samples, args.seed, args.max_map_size)
        print(f"  data: {args.samples} synthetic VSP records (maps 3..{args.max_map_size}), tiny processor; "
              f"prepared in {time.perf_counter() - started:.0f} s")
        opts = {k: v for k, v in vars(args).items() if k != "json"}
        opts.update(shards=shards, processor=processor, workdir=workdir)
        parts = {int(p) for p in args.parts.split(",") if p.strip()}
        results = run_on_ranks(rank_main, WORLD_SIZE, timeout=args.timeout, opts=opts) if parts & {1, 2, 3} else None
        stages = run_on_ranks(rank_main_stages, WORLD_SIZE, timeout=args.timeout, opts=opts) if 4 in parts else None
    summary = report(results, args, time.perf_counter() - started) if results else {}
    if stages:
        summary["stages"] = report_stages(stages)
        print(f"\n  total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "torch": torch.__version__, **summary}, f, indent=2, default=str)
        print(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
