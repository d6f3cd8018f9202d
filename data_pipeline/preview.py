"""Stream training batches and summarise them (the command: `python -m ilvr.data_preview --config CFG`).

Builds each rank's loader exactly as training does (here all ranks in this one process),
streams up to `--batches` batches per rank and prints batch counts, sequence lengths,
latent segments, images, skips and throughput, so a data setup can be checked before
any GPU is spent on it.
"""
from __future__ import annotations

import time


def summarise(rank: int, loader, batches: int) -> dict:
    t0 = time.perf_counter()
    n = tokens = real = segments = images = helpers = samples = 0
    for batch in loader:
        n += 1
        samples += len(batch["ids"])
        tokens += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        segments += batch["latent_segments"].shape[0]
        images += batch["image_grid_thw"].shape[0]
        helpers += batch["helper_image_grid_thw"].shape[0]
        if n >= batches:
            break
    seconds = time.perf_counter() - t0
    print(f"rank {rank}: {len(loader)} batches per epoch; streamed {n} batches ({samples} samples) in "
          f"{seconds:.1f} s = {samples / max(seconds, 1e-9):.1f} samples/s")
    print(f"  per sample: {real / max(samples, 1):.0f} tokens ({real / max(tokens, 1):.0%} of the batch is not "
          f"padding), {segments / max(samples, 1):.1f} latent segments, {images / max(samples, 1):.1f} input "
          f"images, {helpers / max(samples, 1):.1f} helper images")
    print(f"  skipped: {loader.skips.summary()}")
    return {"batches_per_epoch": len(loader), "streamed": n}


def preview(data, latent_size: int, world_size: int, batches: int) -> int:
    """Summarise up to `batches` batches of each of `world_size` ranks' loaders (`data`: the loader's settings,
    data_pipeline.pipeline.DataSettings); 0 when every rank has as many batches per epoch, else 1."""
    from data_pipeline.pipeline import build_train_loader
    from data_pipeline.tiny_processor import load_processor

    processor, latent_ids = load_processor(data.processor)
    counts = []
    for rank in range(world_size):
        loader = build_train_loader(data, latent_size, rank, world_size, processor, latent_ids)
        counts.append(summarise(rank, loader, batches)["batches_per_epoch"])
    same = len(set(counts)) == 1
    print(f"batches per epoch on every rank: {counts} ({'equal' if same else 'NOT EQUAL: ZeRO-3 would hang'})")
    return 0 if same else 1
