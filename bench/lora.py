"""LoRA against full fine-tuning, side by side in one run: teacher memory, peak memory per rank, stage-1 step
time and ZeRO-3 collectives per step.

    python -m bench.lora [--hidden 512 --layers 8 --steps 12 --rank 8 --json out.json]

Both variants train the same data (synthetic 3x3 VSP maps, as the quick start writes them) with
configs/tiny_cpu.yaml resized to an LM of --hidden x --layers, under ZeRO-3 on 2 CPU ranks (torchrun, gloo),
stage 1 only (the momentum teacher runs every step), with `train.comm_stats` on:

  full   the teacher is a second, partitioned copy of the model, EMA over every weight
  lora   `model.lora.r=R`: the teacher is an EMA adapter beside the student's on the shared frozen base

Printed per variant: the teacher's bytes on rank 0 (the trainer's `momentum teacher: ... MB on this rank`),
the peak resident memory of the biggest process (a rank: RUSAGE_CHILDREN of a wrapper around torchrun),
the median step time and EMA time of the steps after the first 2, and all-gather / reduce-scatter calls and
bytes per step; then lora / full ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import add_common_flags, table, write_results
from bench.quickstart_step import prepare
from ilvr.training.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "tiny_cpu.yaml"
# Runs torchrun and prints the peak RSS (KiB) of its biggest descendant: a rank.
PEAK_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def train(out: Path, shards: str, processor: str, a: argparse.Namespace, *extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(a.threads))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-c", PEAK_WRAPPER, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(REPO / "ilvr" / "train.py"), "--deepspeed",
           str(REPO / "ds_configs" / "zero3.json"), "--config", str(RECIPE), "--resume", "never",
           f"train.output_dir={out}", f"data.train_shards={shards}", "data.eval_shards=", "eval.shards=",
           f"data.processor={processor}", f"model.tiny_hidden={a.hidden}", f"model.tiny_layers={a.layers}",
           f"model.tiny_heads={a.heads}", "train.stage=1", f"train.max_steps={a.steps}", "train.stage1_steps=0",
           "data.batch_size=2", "train.save_every=0", "train.comm_stats=true", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training in {out} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = re.search(r"PEAK_RSS_KIB (\d+)", proc.stdout)
    teacher = re.search(r"momentum teacher: ([0-9.]+) MB on this rank", (out / "train.log").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_s" in r and r["step"] > 2]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    return {"teacher_mb_rank0": float(teacher.group(1)) if teacher else None,
            "peak_rss_mib": int(peak.group(1)) / 1024 if peak else None,
            "step_s": median("step_s"), "ema_ms": median("ema_ms"), "steps_timed": len(rows),
            **{k: median(f"comm/{k}") for k in ("all_gather_calls", "all_gather_bytes",
                                                 "reduce_scatter_calls", "reduce_scatter_bytes")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=8, help="model.lora.r of the lora variant")
    p.add_argument("--samples", type=int, default=200, help="synthetic maps written for training")
    add_common_flags(p, seed=False)
    a = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ilvr-bench-lora-") as tmp:
        work = Path(tmp)
        shards, processor = prepare(work, a.samples)
        results = {"settings": vars(a), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                   "full": train(work / "full", shards, processor, a),
                   "lora": train(work / "lora", shards, processor, a, f"model.lora.r={a.rank}")}
    full, lora = results["full"], results["lora"]
    keys = ["teacher_mb_rank0", "peak_rss_mib", "step_s", "ema_ms", "all_gather_calls", "all_gather_bytes",
            "reduce_scatter_calls", "reduce_scatter_bytes"]
    print(f"LoRA (r={a.rank}) vs full fine-tuning: LM hidden {a.hidden} x {a.layers} layers, ZeRO-3, 2 CPU ranks, "
          f"stage 1, {a.steps} steps (medians of steps 3-{a.steps}; comm per step and rank)")

    def fmt(x) -> str:
        return "-" if x is None else f"{x:.4g}"

    table(["", *keys], [["full", *[fmt(full[k]) for k in keys]], ["lora", *[fmt(lora[k]) for k in keys]],
                        ["lora/full", *[fmt(lora[k] / full[k]) if full[k] and lora[k] is not None else "-"
                                        for k in keys]]])
    print(f"  took {time.time() - t0:.0f} s")
    write_results(a.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
