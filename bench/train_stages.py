"""bench/train.py part 4: stage 2 vs stage 1 under ZeRO-3 (per-call gathering, train.gather_once, ZeRO-2,
activation checkpointing) on each gloo rank, and its report. The part is described in bench/train.py."""
from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import current_rss
from bench.train_ranks import WORLD_SIZE, build, loader_batches, mib, recipe, slowest


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
