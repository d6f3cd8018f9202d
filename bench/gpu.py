"""Training throughput of ILVR on one GPU: stage-1 and stage-2 steps of a Qwen2.5-VL-3B-shaped model.

    python -m bench.gpu [--smoke] [--json PATH]

A random-init Qwen2.5-VL of the real classes with Qwen2.5-VL-3B's shapes (text: hidden 2048,
MLP 11008, 36 layers, 16 heads / 2 KV heads, vocabulary 151,936; vision: 32 blocks of 1280),
bf16 with SDPA (or FlashAttention-2 when flash-attn imports), the vision tower frozen as in the
reference, AdamW on the LLM. Batches: synthetic VSP maps (3x3-6x6, one latent step per move,
K = 8) drawn with the benchmark's sprites, through the real encode/collate path and a tiny
processor with Qwen's image settings (28 px per merged token). Measured, each after a warm-up,
CUDA-synchronised, median of `--steps`:

* stage 1 (the momentum teacher's targets + the student's forward/backward + AdamW + the EMA),
  padded and packed batches, at batch 1 and 4;
* stage 2 (free-running latents through the KV cache), at batch 1 and 4, plain and with the
  per-call activation checkpointing (`checkpoint_calls`);
* per row: valid tokens/s, MFU = 6 x trainable params x tokens/s / peak (attention FLOPs not
  counted; peak `--peak-tflops`, 989 for H100/H200 dense bf16), and peak GPU memory.

One GPU needs no ZeRO, so DeepSpeed, webdataset and MLflow are not imported; `bench/gpu.sh`
carries the one package the device image lacks (gymnasium, for the sprites).
`--smoke` runs the same code on a tiny model on the CPU in seconds (CI runs it).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.common import add_common_flags, peak_gpu_bytes, write_results

# Qwen2.5-VL-3B-Instruct's shapes (config.json of the release)
QWEN25VL_3B = dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vision_depth=32,
                   vision_hidden=1280, vision_intermediate=3420, vision_heads=16)
VOCAB_3B = 151936


def make_batches(args, workdir: str):
    """(processor, latent ids, encoded samples) for synthetic VSP maps."""
    from data_pipeline.encode import encode_record
    from data_pipeline.sources.synthetic_vsp import read
    from data_pipeline.tiny_processor import build_tiny_processor, load_processor

    records = list(read(num_samples=args.samples, seed=0, min_size=3, max_size=args.max_map_size))
    texts = [s.text for r in records for s in r.steps if s.kind == "text"] + [r.question for r in records]
    processor, latent_ids = load_processor(build_tiny_processor(os.path.join(workdir, "processor"), texts * 4))
    samples = [encode_record(r, processor, latent_ids, args.latent_size, 8192) for r in records]
    return processor, latent_ids, samples


def build(args, processor, latent_ids, device, dtype):
    from ilvr.model.build import TinySize, build_tiny_model, choose_attention, init_latent_embeddings

    size = TinySize() if args.smoke else TinySize(**QWEN25VL_3B)
    model = build_tiny_model(processor.tokenizer, processor.image_processor, size, seed=0,
                             attn_implementation=choose_attention("auto"))
    init_latent_embeddings(model, processor.tokenizer, latent_ids)
    if not args.smoke:  # the real vocabulary: its embedding and head are ~8% of a 3B model's FLOPs
        model.resize_token_embeddings(VOCAB_3B)
    model = model.to(device, dtype)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ema_(teacher, student, decay: float = 0.999) -> None:
    with torch.no_grad():
        t = [p for p in teacher.parameters()]
        s = [p for p in student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - decay)


def step_fn(kind: str, model, teacher, optimizer, cfg, k: int):
    from ilvr.model.stage1 import stage1_loss
    from ilvr.model.stage2 import stage2_loss

    def run(batch):
        if kind.startswith("stage1"):
            out = stage1_loss(model, teacher, batch, cfg, k)
        else:
            out = stage2_loss(model, batch, checkpoint_calls=kind.endswith("ckpt"))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if kind.startswith("stage1"):
            ema_(teacher, model)
        return float(out.loss.detach())

    return run


def measure(args, kind: str, batch_size: int, model, teacher, optimizer, samples, processor, device) -> dict:
    from data_pipeline.collate import collate_packed, collate_padded
    from ilvr.config import LossConfig

    pad = processor.tokenizer.pad_token_id
    collate = collate_packed if kind == "stage1_packed" else collate_padded
    batches = [collate(samples[i * batch_size:(i + 1) * batch_size], pad)
               for i in range(args.warmup + args.steps)]
    batches = [{key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()} for b in batches]
    run = step_fn(kind, model, teacher, optimizer, LossConfig(), args.latent_size)
    times, tokens = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        loss = run(batch)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            mask = batch.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
    seconds = statistics.median(times)
    tok_s = statistics.median(t / s for t, s in zip(tokens, times))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = args.peak_tflops * 1e12
    return {"kind": kind, "batch": batch_size, "step_s": seconds, "tokens_per_step": statistics.median(tokens),
            "tokens_per_s": tok_s, "mfu": 6 * trainable * tok_s / peak, "loss": loss,
            "peak_gpu_bytes": peak_gpu_bytes(device)}


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps (CI)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--latent-size", type=int, default=8)
    p.add_argument("--max-map-size", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    add_common_flags(p, threads=None, seed=False, out_help=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps, args.batch_sizes, args.max_map_size = 1, 1, [1, 2], 4
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.samples = max(args.batch_sizes) * (args.warmup + args.steps)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as workdir:
        processor, latent_ids, samples = make_batches(args, workdir)
    model = build(args, processor, latent_ids, device, dtype).train()
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.01,
                                  foreach=True)
    params = sum(q.numel() for q in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"ILVR training throughput on {name}: {params / 1e9:.2f} B params, {dtype}, attention "
          f"{model.config._attn_implementation}, K={args.latent_size}, maps 3..{args.max_map_size}")
    rows = []
    for kind in ("stage1_padded", "stage1_packed", "stage2", "stage2_ckpt"):
        for b in args.batch_sizes:
            try:
                row = measure(args, kind, b, model, teacher, optimizer, samples, processor, device)
            except torch.cuda.OutOfMemoryError as e:  # a number too, not a crash
                row = {"kind": kind, "batch": b, "error": f"out of memory: {str(e)[:120]}"}
                torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"  {kind:<14} batch {b}: {row['error']}")
                continue
            mem = f"{row['peak_gpu_bytes'] / 2**30:.1f} GiB" if row["peak_gpu_bytes"] else "-"
            print(f"  {kind:<14} batch {b}: {row['step_s']:.3f} s/step, {row['tokens_per_step']:.0f} tokens, "
                  f"{row['tokens_per_s']:.0f} tokens/s, MFU {100 * row['mfu']:.1f}%, peak {mem}, loss {row['loss']:.3f}")
    print(f"  wall {time.perf_counter() - started:.0f} s")
    write_results(args.json, {"device": name, "torch": torch.__version__, "rows": rows, "settings": vars(args)},
                  say=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
