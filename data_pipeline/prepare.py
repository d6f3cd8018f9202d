"""`ilvr-prepare`: convert a source (ILVR / Mirage / VSP / Zebra-CoT JSONL, or the
built-in synthetic VSP generator) into WebDataset shards with a manifest.

    ilvr-prepare --source mirage --input sample.jsonl --image-root DIR --out shards/mirage

Rows that cannot be used (bad JSON, missing or corrupt image, malformed record) are
skipped, counted per reason, and reported; nothing is dropped silently. More skipped rows
than `--max-skip-fraction` of the input fail the run (exit 1): the shards are kept for
inspection, but manifest.json is marked failed and loaders refuse it. `--out` must be new
or empty; `--overwrite` replaces an earlier ilvr-prepare output there (only the files its
manifest lists), never anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from data_pipeline.limits import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, MAX_SAMPLE_BYTES, Limits
from data_pipeline.records import RecordError, record_to_sample
from data_pipeline.shards import MANIFEST, Manifest, ShardWriter, previous_output
from data_pipeline.skips import SkipCounter, TooManySkips
from data_pipeline.sources import SOURCE_NAMES, get_converter
from data_pipeline.sources.synthetic_vsp import QUESTIONS, STYLES
from data_pipeline.sources.vsp import PROMPTS as VSP_PROMPTS


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
                   help="fail (exit 1, manifest marked failed) when more than this fraction of all rows is "
                        "skipped (default 1.0: never)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier ilvr-prepare output: remove its manifest and the shards it lists "
                        "first (nothing else is ever removed)")
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
    g.add_argument("--style", default="latent-coords", choices=STYLES,
                   help="the reasoning trace (data_pipeline/sources/synthetic_vsp.py): latent or text steps, with "
                        "or without coordinates, a direct answer, or the map-reading (perceive) pre-training task")
    g.add_argument("--question", default="full", choices=tuple(QUESTIONS),
                   help="full: the rules spelled out (~200 tokens); short: the task in ~30 tokens (a model trained "
                        "from scratch reads no rules)")
    v = p.add_argument_group("vsp source")
    v.add_argument("--vsp-prompt", default="row", choices=VSP_PROMPTS,
                   help="row: each row's own text_input; synthetic / synthetic-short: the synthetic data's full / "
                        "short question about the row's map (for models trained only on synthetic maps)")
    z = p.add_argument_group("zebra source")
    z.add_argument("--category", default=None, help="category stored when rows carry none")
    return p


def converter_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.source == "synthetic":
        return {"num_samples": args.num_samples, "seed": args.seed, "min_size": args.min_size, "max_size": args.max_size,
                "style": args.style, "question": args.question}
    if args.source == "vsp":
        return {"prompt": args.vsp_prompt}
    if args.source == "zebra" and args.category:
        return {"category": args.category}
    return {}


class OutputNotEmpty(RuntimeError):
    """--out holds files this run would mix with its own; the message says what to do."""


def claim_out_dir(out: str, overwrite: bool) -> None:
    """Make `out` ready for a new shard set: new or empty, or (with `overwrite`) holding only an earlier
    ilvr-prepare output, whose manifest and listed shards are removed. Stale shards beside a new
    manifest would be read by anyone who globs the directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputNotEmpty(f"--out {out} is a file: give a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    ours, other = previous_output(out)
    if other:
        shown = ", ".join(other[:5]) + (f" (and {len(other) - 5} more)" if len(other) > 5 else "")
        raise OutputNotEmpty(f"--out {out} holds files that are not an earlier ilvr-prepare output ({shown}): "
                             "choose a new --out, or remove them yourself")
    if not overwrite:
        raise OutputNotEmpty(f"--out {out} holds an earlier ilvr-prepare output ({len(ours)} files): pass "
                             "--overwrite to replace it, or choose a new --out")
    for name in sorted(ours, key=lambda n: n == MANIFEST):  # the manifest last: a crash leaves it listing less
        os.remove(os.path.join(out, name))


def prepare(args: argparse.Namespace) -> tuple[Manifest, SkipCounter]:
    if args.source != "synthetic" and not args.input:
        raise SystemExit(f"ilvr-prepare: --input is required for --source {args.source}")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise SystemExit(f"ilvr-prepare: --max-skip-fraction={args.max_skip_fraction} must be in [0, 1]")
    from tqdm import tqdm

    try:
        limits = Limits(args.max_image_pixels, args.max_member_bytes, args.max_sample_bytes)
    except ValueError as e:
        raise SystemExit(f"ilvr-prepare: {str(e).replace('data.', '--').replace('_', '-')}") from None
    read = get_converter(args.source)
    if args.input and (not os.path.exists(args.input) or os.path.isdir(args.input)):  # before --overwrite acts
        raise SystemExit(f"ilvr-prepare: --input {args.input} does not exist or is a directory: give the JSONL file")
    claim_out_dir(args.out, args.overwrite)
    # judged on the whole input at the end: a check on a prefix would stop early or miss bad rows that came first
    skips = SkipCounter(max_fraction=args.max_skip_fraction, what="rows", setting="--max-skip-fraction",
                        check_each=False)
    writer = ShardWriter(args.out, args.prefix, args.samples_per_shard, source=f"{args.source}:{args.input or ''}")
    items = read(args.input, args.image_root, task=args.task, **converter_options(args))
    bar = tqdm(items, desc=f"ilvr-prepare {args.source}", unit="rec", disable=args.no_progress, file=sys.stderr)
    try:
        _write_all(args, bar, writer, skips, limits)
    except BaseException as e:  # a full disk, an unreadable input, Ctrl-C: no .tar.tmp left, the set marked failed
        writer.abort(f"ilvr-prepare stopped: {type(e).__name__}: {e}")
        raise
    try:
        skips.check(final=True)
        error = ""
    except TooManySkips as e:
        error = str(e)
    return writer.close(skipped=dict(skips.skipped), error=error), skips


def _write_all(args: argparse.Namespace, bar, writer: ShardWriter, skips: SkipCounter, limits: Limits) -> None:
    written = 0
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


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest, skips = prepare(args)
    except (OSError, OutputNotEmpty) as e:
        print(f"ilvr-prepare: {e}", file=sys.stderr)
        if not isinstance(e, OutputNotEmpty) and os.path.isdir(args.out):
            print(f"ilvr-prepare: {args.out} is incomplete and refused by training and evaluation; prepare "
                  "again with --overwrite", file=sys.stderr)
        return 1
    print(f"wrote {manifest.total_samples} samples in {len(manifest.shards)} shards to {args.out}; "
          f"skipped {skips.total_skipped}: {skips.summary()}")
    if manifest.error:
        print(f"ilvr-prepare: {manifest.error} The shards are kept for inspection; {args.out}/{MANIFEST} is marked "
              "failed, so training and evaluation refuse them.", file=sys.stderr)
        return 1
    if manifest.total_samples == 0:
        print("ilvr-prepare: no sample was written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
