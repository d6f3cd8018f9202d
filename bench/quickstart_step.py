"""Where the quick start's training step time goes, and what each of three changes saves, side by side.

    python -m bench.quickstart_step [--steps 70] [--stage1-steps 40] [--repeats 2] [--json PATH]

The quick start (scripts/quickstart.sh) trains configs/quickstart.yaml with ZeRO-3 on 2 CPU ranks
through the deepspeed launcher. This script writes the same kind of data (synthetic 3x3 VSP maps,
the short question, 'Move R.' + a latent step per move) and the same processor into a temporary
directory, then runs ilvr/train.py on 2 ranks (torchrun) with the recipe for --steps steps
(--stage1-steps of stage 1, the rest stage 2), once per variant, --repeats times interleaved:

  before       reduce_bucket_size = h^2 (transformers' rule, 16384 for h=128) and 2 torch threads per
               rank (what each rank took under the deepspeed launcher, which sets no OMP_NUM_THREADS)
  threads      the same buckets, 1 thread per rank (share_cpu_threads: torch's threads / the local ranks)
  now          the "auto" buckets (floored at 10^6 elements) and 1 thread per rank

It prints the median step time per stage (steps after the first 5 of each stage), the ratios, and
the reduce-scatter calls per step of each bucket rule (a short extra run with train.comm_stats).
`--smoke` (the test's size, no timing meant): only "before" and "now", each once with train.comm_stats
on, the calls counted in those runs.
The patch embedding's Conv3d vs the matmul on the same parameters (ilvr/model/patch_embed.py) is
measured in this process, 1 thread, on the recipe's model and a batch of the quick start's images:
all variants above use the matmul. Same data, seeds and losses in every variant (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_common_flags, write_results
from ilvr.training.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "quickstart.yaml"
BUCKET_RULE = {"before": "h^2 buckets", "threads": "h^2 buckets", "now": "auto (floored)"}  # reduce_bucket_size


def prepare(workdir: Path, samples: int) -> tuple[str, str]:
    """Shards and processor as scripts/quickstart.sh makes them (fewer samples)."""
    shards, processor = workdir / "shards", workdir / "processor"
    run([sys.executable, "-m", "data_pipeline.prepare", "--source", "synthetic", "--style", "latent-moves",
         "--num-samples", str(samples), "--seed", "0", "--min-size", "3", "--max-size", "3", "--question", "short",
         "--out", str(shards), "--prefix", "train", "--samples-per-shard", "100", "--no-progress"])
    run([sys.executable, "-m", "data_pipeline.tiny_processor", "--shards", str(shards), "--out", str(processor),
         "--patch-size", "32", "--min-pixels", "36864", "--max-pixels", "262144", "--system-prompt", ""])
    return str(shards), str(processor)


def run(cmd: list[str], env: "dict | None" = None) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def ds_config(workdir: Path, reduce_bucket: "int | None") -> str:
    """ds_configs/zero3.json, with reduce_bucket_size fixed when given."""
    if reduce_bucket is None:
        return str(REPO / "ds_configs" / "zero3.json")
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["reduce_bucket_size"] = reduce_bucket
    path = workdir / f"zero3_bucket{reduce_bucket}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def train(out: Path, shards: str, processor: str, ds: str, threads: int, steps: int, stage1: int,
          *extra: str) -> list[dict]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env.pop("MLFLOW_TRACKING_URI", None)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(REPO / "ilvr" / "train.py"), "--deepspeed", ds, "--config", str(RECIPE), "--resume", "never",
         f"train.output_dir={out}", f"data.train_shards={shards}", "data.eval_shards=", f"data.processor={processor}",
         f"train.max_steps={steps}", f"train.stage1_steps={stage1}", "train.save_every=0", *extra], env=env)
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stage_medians(rows: list[dict]) -> dict[int, float]:
    out = {}
    for stage in (1, 2):
        times = [r["step_s"] for r in rows if r["stage"] == stage][5:]
        if times:
            out[stage] = statistics.median(times)
    return out


def patch_embed_ms(processor_dir: str, repeats: int = 20) -> dict[str, float]:
    """Vision-tower forward (the recipe's model, frozen as in training) with the stock Conv3d and with the
    matmul on the same parameters, one thread, on 8 samples' images of the quick start."""
    import torch

    from data_pipeline.collate import collate_padded
    from data_pipeline.encode import encode_record
    from data_pipeline.tiny_processor import load_processor
    from ilvr.config import load_config
    from ilvr.model.build import TinySize, build_tiny_model
    from data_pipeline.records import RecordError
    from data_pipeline.sources.synthetic_vsp import read as synthetic
    from ilvr.model.patch_embed import use_patch_matmul

    torch.set_num_threads(1)
    cfg = load_config([str(RECIPE)], [f"data.processor={processor_dir}", "data.train_shards=", "data.eval_shards="],
                      check_paths=False)
    processor, latent_ids = load_processor(processor_dir)
    records = [r for r in synthetic(num_samples=8, seed=1, min_size=3, max_size=3, style="latent-moves",
                                    question="short") if not isinstance(r, RecordError)]
    batch = collate_padded([encode_record(r, processor, latent_ids, cfg.model.latent_size, 1024) for r in records],
                           processor.tokenizer.pad_token_id)
    model = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize.from_config(cfg.model)).eval()
    visual = model.model.visual

    @torch.no_grad()
    def features() -> torch.Tensor:
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        return out.pooler_output if hasattr(out, "pooler_output") else (out[0] if isinstance(out, tuple) else out)

    def timed() -> list[float]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            features()
            times.append(time.perf_counter() - t0)
        return times

    conv_out, conv_times = features(), timed()
    use_patch_matmul(model)
    mm_out, mm_times = features(), timed()
    diff = float((conv_out - mm_out).abs().max())
    return {"patches": int(batch["pixel_values"].shape[0]), "conv_ms": 1000 * statistics.median(conv_times),
            "matmul_ms": 1000 * statistics.median(mm_times), "max_abs_diff": diff}


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quickstart_step", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--stage1-steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2, help="runs per variant (interleaved)")
    p.add_argument("--samples", type=int, default=600, help="synthetic maps written to the shards")
    p.add_argument("--smoke", action="store_true", help="before and now once each, calls counted in those runs")
    add_common_flags(p, threads=None, seed=False, out_help=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    hidden = 128  # configs/quickstart.yaml model.tiny_hidden
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-qs-") as tmp:
        work = Path(tmp)
        shards, processor = prepare(work, args.samples)
        variants = {"before": (ds_config(work, hidden * hidden), 2), "threads": (ds_config(work, hidden * hidden), 1),
                    "now": (ds_config(work, None), 1)}
        if args.smoke:
            del variants["threads"]
        counted = ("train.comm_stats=true",) if args.smoke else ()
        medians: dict[str, list[dict[int, float]]] = {name: [] for name in variants}
        losses: dict[str, float] = {}
        calls = {}
        for rep in range(args.repeats):
            for name, (ds, threads) in variants.items():
                rows = train(work / f"{name}{rep}", shards, processor, ds, threads, args.steps, args.stage1_steps,
                             *counted)
                medians[name].append(stage_medians(rows))
                losses[name] = rows[-1]["loss"]
                if counted:
                    calls[BUCKET_RULE[name]] = statistics.median(r["comm/reduce_scatter_calls"] for r in rows[3:])
                print(f"  {name} run {rep + 1}: " + ", ".join(f"stage {s} {t:.3f} s" for s, t in
                                                             medians[name][-1].items()), flush=True)
        for name in () if counted else ("threads", "now"):  # the two bucket rules
            rows = train(work / f"comm-{name}", shards, processor, variants[name][0], 1, 12, 8, "train.comm_stats=true")
            calls[BUCKET_RULE[name]] = statistics.median(r["comm/reduce_scatter_calls"] for r in rows[3:])
        patch = patch_embed_ms(processor)

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps,
              "stage1_steps": args.stage1_steps, "repeats": args.repeats, "final_loss": losses,
              "step_s": {name: {s: statistics.median(m[s] for m in runs) for s in runs[0]}
                         for name, runs in medians.items()},
              "reduce_scatter_calls_per_step": calls,
              "patch_embed": patch, "wall_s": time.time() - started}
    s = result["step_s"]
    print(f"\nquick start recipe, ZeRO-3 on 2 CPU ranks, {args.steps} steps ({args.stage1_steps} stage 1), "
          f"median step time of {args.repeats} runs per variant:")
    for name in variants:
        print(f"  {name:8s} stage 1 {s[name][1]:.3f} s   stage 2 {s[name].get(2, float('nan')):.3f} s   "
              f"final loss {losses[name]:.4f}")
    for stage in (1, 2):
        if stage in s["now"] and "threads" in s:
            print(f"  stage {stage}: before/threads {s['before'][stage] / s['threads'][stage]:.2f}x, "
                  f"threads/now {s['threads'][stage] / s['now'][stage]:.2f}x, before/now "
                  f"{s['before'][stage] / s['now'][stage]:.2f}x")
    print("  reduce-scatter calls per step: " + ", ".join(f"{rule} {n:.0f}" for rule, n in calls.items()))
    print(f"  vision tower forward, {patch['patches']} patches, 1 thread: Conv3d {patch['conv_ms']:.1f} ms, matmul "
          f"{patch['matmul_ms']:.1f} ms ({patch['conv_ms'] / patch['matmul_ms']:.2f}x; max |diff| "
          f"{patch['max_abs_diff']:.1e})")
    print(f"  wall time {result['wall_s']:.0f} s")
    if len(set(round(v, 4) for v in losses.values())) != 1:
        print("  WARNING: the variants' final losses differ: they did not train the same model", file=sys.stderr)
    write_results(args.json, result, say=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
