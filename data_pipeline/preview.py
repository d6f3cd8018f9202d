"""`python -m data_pipeline.preview --config CFG [overrides]`: stream training batches and summarise them.

Builds each rank's loader exactly as training does (here all ranks in this one process),
streams up to `--batches` batches per rank and prints batch counts, sequence lengths,
latent segments, images, skips and throughput, so a data setup can be checked before
any GPU is spent on it.
"""
from __future__ import annotations

import argparse
import sys
import time

from ilvr.config import ConfigError, load_config


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


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks to plan for (default 2)")
    parser.add_argument("--batches", type=int, default=4, help="batches to stream per rank")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from data_pipeline.pipeline import build_train_loader
    from data_pipeline.tiny_processor import load_processor

    processor, latent_ids = load_processor(cfg.data.processor)
    counts = []
    for rank in range(args.world_size):
        loader = build_train_loader(cfg.data, cfg.model.latent_size, rank, args.world_size, processor, latent_ids)
        counts.append(summarise(rank, loader, args.batches)["batches_per_epoch"])
    same = len(set(counts)) == 1
    print(f"batches per epoch on every rank: {counts} ({'equal' if same else 'NOT EQUAL: ZeRO-3 would hang'})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
