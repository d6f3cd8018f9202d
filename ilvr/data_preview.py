"""`python -m ilvr.data_preview --config CFG [overrides]`: stream training batches and summarise them.

Reads the training config as ilvr-train does and hands its `data` section to data_pipeline.preview,
which builds each rank's loader exactly as training does (here all ranks in this one process),
streams up to `--batches` batches per rank and prints batch counts, sequence lengths,
latent segments, images, skips and throughput, so a data setup can be checked before
any GPU is spent on it.
"""
from __future__ import annotations

import argparse
import sys

from ilvr.config import ConfigError, load_config


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ilvr.data_preview", description=__doc__.split("\n\n")[0])
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
    from data_pipeline.preview import preview

    return preview(cfg.data, cfg.model.latent_size, args.world_size, args.batches)


if __name__ == "__main__":
    sys.exit(main())
