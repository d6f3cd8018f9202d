"""Train an ILVR model with DeepSpeed.

    deepspeed --num_gpus 8 ilvr/train.py --deepspeed ds_configs/zero3.json \\
        --config configs/qwen25vl_7b_vsp.yaml train.lr=2e-5
    torchrun --nproc_per_node 2 ilvr/train.py ...        srun python ilvr/train.py ...

The configuration is validated before anything distributed starts; every "auto" of the
DeepSpeed config is resolved from it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make `ilvr` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ilvr.config import ConfigError, load_config  # noqa: E402


AUTO_DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero3.json")


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ilvr-train", description="Train an ILVR model with DeepSpeed.")
    p.add_argument("--deepspeed", default="auto",
                   help="DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, zero3_offload.json); 'auto' "
                        "(default) = the repository's ds_configs/zero3.json. Its \"auto\" values are filled from "
                        "the training config either way")
    p.add_argument("--config", action="append", required=True, help="YAML recipe (repeatable; later ones win)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (default): continue the run in train.output_dir if its recorded config matches "
                        "(fields that may change: docs/training.md), else start one; 'never': a new run (refused "
                        "if the dir holds one); or a checkpoint / run dir to continue from, whatever its config")
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue the run in train.output_dir although fields it cannot change on resume differ "
                        "(e.g. train.lr); the change is recorded in <output_dir>/config.history.jsonl")
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
        ds_path = AUTO_DS_CONFIG if args.deepspeed == "auto" else args.deepspeed
        if not os.path.isfile(ds_path):
            raise ConfigError(f"--deepspeed {args.deepspeed!r} -> {ds_path} does not exist: give a DeepSpeed JSON "
                              "(see ds_configs/ in the repository)")
        load_ds_config(ds_path)  # value types checked here, before any process group or model
    except (ConfigError, DeepSpeedConfigError) as e:
        print(f"ilvr-train: config error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from ilvr.evaluation.periodic import PeriodicEval
    from ilvr.training.checkpoint_verify import CheckpointError
    from ilvr.training.distributed import end_process
    from ilvr.training.health import TrainingDiverged
    from ilvr.training.run_dir import RunDirRefused
    from ilvr.training.run_lock import OutputDirBusy
    from ilvr.training.trainer import Trainer

    try:
        Trainer(cfg, ds_path, resume=args.resume, allow_config_change=args.allow_config_change,
                evaluation=PeriodicEval).run()
        code = 0
    except ConfigError as e:  # found at start-up (train.epochs against the shards): every rank says it
        print(f"ilvr-train: config error: {e}", file=sys.stderr)
        code = 2
    except (OutputDirBusy, CheckpointError, DeepSpeedConfigError, RunDirRefused) as e:  # refusals: no traceback
        print(f"ilvr-train: {e}", file=sys.stderr)
        code = 3
    except TrainingDiverged as e:  # a failed run, but the message says all there is: no traceback
        logging.getLogger("ilvr.train").error("%s", e)
        code = 1
    except BaseException as e:
        if not dist.is_initialized():
            raise
        # logged here (console and train.log, every rank): end_process leaves without the interpreter's report
        logging.getLogger("ilvr.train").exception("training failed: %s: %s", type(e).__name__, e)
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    return end_process(code)  # with a process group, the process ends in there


if __name__ == "__main__":
    sys.exit(main())
