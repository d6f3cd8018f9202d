"""`ilvr-prepare`: convert a source (ILVR / Mirage / VSP / Zebra-CoT JSONL, or the
built-in synthetic VSP generator) into WebDataset shards with a manifest.

    ilvr-prepare --source mirage --input sample.jsonl --image-root DIR --out shards/mirage

Rows that cannot be used (bad JSON, missing or corrupt image, malformed record) are
skipped, counted per reason, and reported; nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from data_pipeline.limits import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES, Limits
from data_pipeline.records import RecordError, record_to_sample
from data_pipeline.shards import Manifest, ShardWriter
from data_pipeline.skips import SkipCounter, TooManySkips
from data_pipeline.sources import SOURCE_NAMES, get_converter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilvr-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=SOURCE_NAMES)
    p.add_argument("--input", default=None, help="source JSONL file (not used by --source synthetic)")
    p.add_argument("--image-root", default=None, help="directory that relative image paths are resolved against")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--prefix", default="train", help="shard file prefix (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--task", default=None, help="override the task name stored in each record (vsp, comt, zebra, ...)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many written samples (0 = all)")
    p.add_argument("--max-skip-fraction", type=float, default=1.0,
                   help="fail when more than this fraction of rows is skipped (default 1.0: never)")
    p.add_argument("--no-verify-images", action="store_true",
                   help="do not decode images while writing (faster; their headers and sizes are still checked)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"skip rows with an image of more pixels, read from its header (default {MAX_IMAGE_PIXELS})")
    p.add_argument("--max-member-bytes", type=int, default=MAX_MEMBER_BYTES,
                   help=f"skip rows with an image file larger than this (default {MAX_MEMBER_BYTES})")
    p.add_argument("--max-sample-bytes", type=int, default=MAX_SAMPLE_BYTES,
                   help=f"skip rows whose images total more than this (default {MAX_SAMPLE_BYTES})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-samples", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--min-size", type=int, default=3)
    g.add_argument("--max-size", type=int, default=8)
    z = p.add_argument_group("zebra source")
    z.add_argument("--category", default=None, help="category stored when rows carry none")
    return p


def converter_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.source == "synthetic":
        return {"num_samples": args.num_samples, "seed": args.seed, "min_size": args.min_size, "max_size": args.max_size}
    if args.source == "zebra" and args.category:
        return {"category": args.category}
    return {}


def prepare(args: argparse.Namespace) -> tuple[Manifest, SkipCounter]:
    if args.source != "synthetic" and not args.input:
        raise SystemExit(f"ilvr-prepare: --input is required for --source {args.source}")
    from tqdm import tqdm

    try:
        limits = Limits(args.max_image_pixels, args.max_member_bytes, args.max_sample_bytes)
    except ValueError as e:
        raise SystemExit(f"ilvr-prepare: {str(e).replace('data.', '--').replace('_', '-')}") from None
    read = get_converter(args.source)
    skips = SkipCounter(max_fraction=args.max_skip_fraction, what="rows")
    writer = ShardWriter(args.out, args.prefix, args.samples_per_shard, source=f"{args.source}:{args.input or ''}")
    written = 0
    items = read(args.input, args.image_root, task=args.task, **converter_options(args))
    bar = tqdm(items, desc=f"ilvr-prepare {args.source}", unit="rec", disable=args.no_progress, file=sys.stderr)
    for item in bar:
        try:
            if isinstance(item, RecordError):
                raise item
            sample = record_to_sample(item, written, verify_images=not args.no_verify_images, limits=limits)
        except RecordError as e:
            skips.skip(e.reason, str(e))
            bar.set_postfix(skipped=skips.total_skipped)
            continue
        writer.write(sample)
        skips.ok()
        written += 1
        if args.limit and written >= args.limit:
            break
    return writer.close(skipped=dict(skips.skipped)), skips


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest, skips = prepare(args)
    except TooManySkips as e:
        print(f"ilvr-prepare: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ilvr-prepare: {e}", file=sys.stderr)
        return 1
    print(f"wrote {manifest.total_samples} samples in {len(manifest.shards)} shards to {args.out}; "
          f"skipped {skips.total_skipped}: {skips.summary()}")
    if manifest.total_samples == 0:
        print("ilvr-prepare: no sample was written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
