"""Train an ILVR model with DeepSpeed.

    deepspeed --num_gpus 8 ilvr/train.py --deepspeed ds_configs/zero3.json \\
        --config configs/qwen25vl_7b_vsp.yaml train.lr=2e-5
    torchrun --nproc_per_node 2 ilvr/train.py ...        srun python ilvr/train.py ...

The configuration is validated before anything distributed starts; every "auto" of the
DeepSpeed config is resolved from it.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make `ilvr` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ilvr.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ilvr-train", description="Train an ILVR model with DeepSpeed.")
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON config (ds_configs/zero3.json); 'auto' allowed")
    p.add_argument("--config", action="append", required=True, help="YAML recipe (repeatable; later ones win)")
    p.add_argument("--resume", default="auto", help="'auto' (latest complete checkpoint), 'never', or a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 data.batch_size=4")
    return p.parse_args(argv)


def main(argv: "list[str] | None" = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from ilvr.training.ds_config import DeepSpeedConfigError, load_ds_config

    try:
        cfg = load_config(args.config, args.overrides)
        if not os.path.isfile(args.deepspeed):
            raise ConfigError(f"--deepspeed {args.deepspeed!r} does not exist (see ds_configs/)")
        load_ds_config(args.deepspeed)  # value types checked here, before any process group or model
    except (ConfigError, DeepSpeedConfigError) as e:
        print(f"ilvr-train: config error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from ilvr.training.checkpoint import CheckpointError, OutputDirBusy
    from ilvr.training.trainer import Trainer

    try:
        Trainer(cfg, args.deepspeed, resume=args.resume).run()
    except (OutputDirBusy, CheckpointError, DeepSpeedConfigError) as e:  # refusals: every rank says why, no traceback
        print(f"ilvr-train: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
