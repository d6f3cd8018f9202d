"""bench/train.py, rank side of parts 1-3 (run on each gloo rank by run_on_ranks): building the student and
the momentum teacher as `Trainer` does, the EMA step (ours vs the gathered reference), the teacher's memory,
and the tiny recipe's step breakdown. The parts are described in bench/train.py."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import current_rss, peak_rss

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny_cpu.yaml"
DS_CONFIG = REPO / "ds_configs" / "zero3.json"
WORLD_SIZE = 2
STEP_PARTS = ("data", "forward_backward", "nan_check", "optimizer", "ema")


# ----------------------------------------------------------------------------- rank side: building


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


# ----------------------------------------------------------------------------- numbers for the reports (parent)


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Per iteration, the time of the slower rank (a step costs what its slowest rank takes)."""
    return [max(ts) for ts in zip(*per_rank)]


def ms(seconds: float) -> float:
    return seconds * 1e3


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"
