"""ilvr-eval: evaluate a model on benchmark shards, score a predictions file, or run a sweep.

    ilvr-eval [run] --model EXPORTED_OR_CHECKPOINT --shards SHARDS --out DIR [--mode latent|text|constant-latent|shuffled-latent]
    torchrun --nproc_per_node 8 -m ilvr.evaluate run ...        (data parallel; also under srun)
    ilvr-eval score --predictions FILE --benchmark vsp --data SHARDS [--out metrics.json]
    ilvr-eval sweep plan|task|summary|run ...                     (see ilvr.evaluation.sweep)

Metrics JSON goes to stdout (rank 0); predictions, metrics and an MLflow run to --out, which one
evaluation at a time holds (exit 3 when another holds it). Exit codes: 0 done, 1 error, 2 bad input, 3 refusal.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from datetime import timedelta

from ilvr.config import ConfigError
from ilvr.model.generate import MODES

SUBCOMMANDS = ("run", "score", "sweep")
BENCHMARK_CHOICES = ("auto", "vsp", "comt", "zebra")


def _decode_args(p: argparse.ArgumentParser, with_mode: bool = True) -> None:
    g = p.add_argument_group("decoding (greedy unless --do-sample; defaults: --config's eval section, else these)")
    if with_mode:
        g.add_argument("--mode", choices=MODES, default=None,
                       help="latent (ILVR, default); text = no latent segments; ablations at the fed-back "
                            "states' scale: constant-latent = one constant (the training run's mean fed-back state), "
                            "shuffled-latent = another sample's latents")
    g.add_argument("--max-new-tokens", type=int, default=None, help="ids per answer, latent pads included (512)")
    g.add_argument("--batch-size", type=int, default=None, help="prompts decoded together per rank (8)")
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float, default=None, help="(1.0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N records (eval.limit)")


def _tracking_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MLflow")
    g.add_argument("--tracking-uri", default=None,
                   help="default: the store of the training run the model comes from (recorded with the checkpoint "
                        "or export), else MLFLOW_TRACKING_URI, else sqlite in the output dir")
    g.add_argument("--experiment", default=None,
                   help="default: MLFLOW_EXPERIMENT_NAME, else the training run's experiment, else 'ilvr-eval'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ilvr-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="decode and score one model on one benchmark")
    run.add_argument("--model", required=True, help="exported HF dir, step-<N> checkpoint dir, or run dir (latest)")
    run.add_argument("--shards", default=None, help="benchmark shards from ilvr-prepare (dir, manifest or pattern)")
    run.add_argument("--out", required=True, help="output dir: predictions.jsonl, metrics.json")
    run.add_argument("--benchmark", choices=BENCHMARK_CHOICES, default=None, help="scorer; auto = the records' task")
    run.add_argument("--config", action="append", default=None,
                     help="a training recipe YAML: its eval section gives the defaults of the options here")
    run.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    run.add_argument("--parent-run-id", default=None, help="log as a child of this MLflow run")
    run.add_argument("--run-name", default=None)
    run.add_argument("--no-mlflow", action="store_true", help="write files only")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar while decoding (it is shown on rank 0 when stderr is a terminal; "
                          "otherwise a log line every tenth of the records)")
    run.add_argument("--collective-timeout", type=float, default=1800.0, help="seconds; multi-rank only")
    _decode_args(run)
    _tracking_args(run)

    score = sub.add_parser("score", help="score an existing predictions JSONL (rows with id, prediction)")
    score.add_argument("--predictions", required=True)
    score.add_argument("--benchmark", choices=BENCHMARK_CHOICES, default="auto")
    score.add_argument("--data", required=True, help="the benchmark shards the ids refer to")
    score.add_argument("--out", default=None, help="also write the metrics JSON here")

    sweep = sub.add_parser("sweep", help="checkpoints x benchmarks x modes as MLflow child runs")
    steps = sweep.add_subparsers(dest="step", required=True)
    for name in ("plan", "run"):
        p = steps.add_parser(name, help="write the sweep plan" if name == "plan" else "plan, every task, summary")
        p.add_argument("--out", required=True, help="sweep dir")
        p.add_argument("--checkpoints", nargs="+", default=None)
        p.add_argument("--checkpoint-list", default=None, help="file with one checkpoint path per line")
        p.add_argument("--checkpoint-glob", default=None, help="e.g. 'runs/x/checkpoints/step-*' (quote it)")
        p.add_argument("--benchmark", action="append", required=True, metavar="NAME=SHARDS")
        p.add_argument("--modes", nargs="+", choices=MODES, default=["latent"])
        p.add_argument("--name", default=None, help="sweep name (default: the dir name)")
        _decode_args(p, with_mode=False)
        _tracking_args(p)
    task = steps.add_parser("task", help="run one task of a planned sweep: one checkpoint, loaded once, on all its "
                            "benchmarks x modes (a job array element)")
    task.add_argument("--sweep", required=True)
    task.add_argument("--index", type=int, default=None, help="default: SLURM_ARRAY_TASK_ID")
    summary = steps.add_parser("summary", help="summary.md/.csv of a sweep; exit 1 if a task has no result")
    summary.add_argument("--sweep", required=True)
    return parser


def fill_defaults(args) -> None:
    """Options left unset take the --config recipe's eval section, else EvalConfig's defaults; the shards,
    when eval.shards is empty too, are the recipe's held-out split (data.eval_shards)."""
    from ilvr.config import EvalConfig, load_config

    recipe = load_config(args.config, check_paths=False) if getattr(args, "config", None) else None
    section = recipe.eval if recipe is not None else EvalConfig()
    for name in ("shards", "benchmark", "mode", "max_new_tokens", "batch_size", "do_sample", "temperature", "limit"):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, getattr(section, name))
    if getattr(args, "limit", None) == 0:  # eval.limit: 0 = every record
        args.limit = None
    if hasattr(args, "shards") and not args.shards and recipe is not None:
        args.shards = recipe.data.eval_shards
    if hasattr(args, "shards") and not args.shards:
        raise ValueError("no benchmark shards: pass --shards (or --config with eval.shards or data.eval_shards set)")


def _decode_settings(args, mode: str | None = None):
    from ilvr.evaluation.evaluate import DecodeSettings

    fill_defaults(args)
    return DecodeSettings(mode=mode or args.mode, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _start_ranks(timeout_s: float):
    """A process group when launched on several ranks (torchrun, srun); else None."""
    import torch

    from ilvr.training.distributed import dist_info_from_env, setup_logging, share_cpu_threads

    info = dist_info_from_env()
    setup_logging(info)
    if info.world_size > 1 and not torch.distributed.is_initialized():
        share_cpu_threads()
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             timeout=timedelta(seconds=timeout_s))
    return info


def cmd_run(args) -> int:
    import torch

    from ilvr.evaluation.evaluate import EvalRequest, run_evaluation
    from ilvr.evaluation.loading import resolve_model_path

    decode = _decode_settings(args)
    resolve_model_path(args.model)  # a wrong --model fails here, before any process group or file is touched
    info = _start_ranks(args.collective_timeout)
    device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    req = EvalRequest(model=args.model, shards=args.shards, out_dir=args.out, benchmark=args.benchmark,
                      decode=decode, limit=args.limit, dtype=args.dtype, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, parent_run_id=args.parent_run_id, run_name=args.run_name,
                      mlflow=not args.no_mlflow, device=device, progress=not args.no_progress)
    result = run_evaluation(req)  # shards and references are checked before the model is loaded
    if info.is_main:
        print(json.dumps(result["metrics"], sort_keys=True))
    return 0


def read_predictions(path: str) -> list[dict]:
    """Rows of a predictions JSONL; each needs string `id` and `prediction` (errors name the line)."""
    from data_pipeline.sources import iter_jsonl

    rows, seen = [], set()
    for n, row in iter_jsonl(path):
        if isinstance(row, Exception):
            raise ValueError(str(row))
        if not (isinstance(row.get("id"), str) and isinstance(row.get("prediction"), str)):
            raise ValueError(f"{path}:{n}: a row needs string fields 'id' and 'prediction'")
        if row["id"] in seen:
            raise ValueError(f"{path}:{n}: id {row['id']!r} appears twice")
        seen.add(row["id"])
        rows.append(row)
    return rows


def cmd_score(args) -> int:
    from ilvr.evaluation.data import load_records
    from ilvr.evaluation.evaluate import score_rows, write_json_atomic
    from ilvr.evaluation.scorers import infer_benchmark

    rows = read_predictions(args.predictions)
    data = load_records(args.data)
    benchmark = infer_benchmark(data.records) if args.benchmark == "auto" else args.benchmark
    metrics = score_rows(rows, data.by_id(), benchmark)
    missing = len(data.records) - len(rows)
    metrics["missing"] = float(missing)  # records with no prediction: not in the denominators
    if missing:
        logging.warning("%d of %d records have no prediction; accuracy is over the %d predicted", missing,
                        len(data.records), len(rows))
    if data.skipped:
        metrics["skipped"] = float(sum(data.skipped.values()))
    if args.out:
        write_json_atomic(args.out, metrics)
    print(json.dumps(metrics, sort_keys=True))
    return 0


def cmd_sweep(args) -> int:
    from ilvr.evaluation import sweep

    if args.step in ("plan", "run"):
        checkpoints = sweep.collect_checkpoints(args.checkpoints, args.checkpoint_list, args.checkpoint_glob)
        plan = sweep.plan(args.out, checkpoints, sweep.parse_benchmarks(args.benchmark), args.modes,
                          _decode_settings(args, mode=args.modes[0]), args.limit, args.tracking_uri,
                          args.experiment, args.name)
        if args.step == "plan":
            print(len(plan["tasks"]))
            return 0
        for task in plan["tasks"]:
            try:
                sweep.run_task(args.out, task["index"])
            except Exception:  # one bad checkpoint must not cost the rest of the sweep; summary names it
                logging.exception("sweep task %d (%s) failed", task["index"], task["checkpoint"])
        _, missing = sweep.write_summary(args.out)
        print(os.path.join(args.out, "summary.md"))
        return 1 if missing else 0
    if args.step == "task":
        index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if index is None:
            raise ValueError("give --index (or run inside a Slurm job array: SLURM_ARRAY_TASK_ID)")
        sweep.run_task(args.sweep, int(index))
        return 0
    rows, missing = sweep.write_summary(args.sweep)
    print(os.path.join(args.sweep, "summary.md"))
    if missing:
        print(f"ilvr-eval: tasks without results: {missing} (rerun them with `ilvr-eval sweep task --sweep "
              f"{args.sweep} --index I`)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # `ilvr-eval --model ...` means run
    args = build_parser().parse_args(argv)
    import torch

    from ilvr.training.run_lock import OutputDirBusy
    from ilvr.training.distributed import end_process

    if not (args.command == "run"):  # run sets up rank-aware logging itself
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = {"run": cmd_run, "score": cmd_score, "sweep": cmd_sweep}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, IndexError, ConfigError) as e:
        print(f"ilvr-eval: error: {e}", file=sys.stderr)
        code = 2
    except OutputDirBusy as e:  # a refusal, as in ilvr-train: every rank learnt it at once, no traceback
        print(f"ilvr-eval: {e}", file=sys.stderr)
        code = 3
    except BaseException as e:
        if not torch.distributed.is_initialized():
            raise
        traceback.print_exc()  # printed here: end_process leaves without the interpreter's own report
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
    return end_process(code)  # `run` on several ranks: the process ends in there


if __name__ == "__main__":
    raise SystemExit(main())
