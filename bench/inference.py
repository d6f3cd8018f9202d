"""Inference cost of ILVR on CPU: latent reasoning vs pixel-level interleaved reasoning, side by side.

    python -m bench.inference [--out inference.json] [--repeats 4] [--segments 1 2 3 4 5 6]
                              [--batch-sizes 1 8 32] [--quick]

What a latent segment (K fed-back hidden states, KV cache) saves over the pixel-level step it stands
for: draw the intermediate state, run the image processor and the vision encoder, append its tokens.

Model: a random-init Qwen2.5-VL of the real classes (`build_tiny_model`) shaped like Qwen2.5-VL-7B
scaled down (LLM 7 layers / hidden 384 / MLP 2030 / heads of 128, one KV head; vision 8 blocks /
hidden 128 / MLP 342, window attention with full attention in every 8th block and the last, as 7B;
vision / LLM parameters 0.11, 7B: 0.09). The tiny tokenizer with Qwen2.5-VL's default image settings,
so image token counts are the real ones. Synthetic VSP maps at 64 px per square: 3x3..6x6 (192..384
px) and the reference 7x7 = 448 px (256 image tokens: a real VSP level, the method's candidate cap L).

1. One sample, the same scripted trajectory for both: prompt prefill; per segment the move's text
   decoded token by token with the cache, then (a) <|latent_start|> + K fed-back steps + <|latent_end|>
   or (b) render the map after the move -> image processor -> vision encoder -> <|vision_start|> +
   image tokens + <|vision_end|> prefilled into the cache in one call, at the mrope positions
   `get_rope_index` gives them in the whole sequence; then the answer. Every step pays lm_head + argmax
   as generation does (the script replaces its choice). 1..6 segments, variants interleaved after one
   warm-up, medians, time per phase; FLOPs counted by torch give the compute-bound ratio.
2. Throughput at batch 1/8/32, mixed map sizes: (a) `generate(..., mode="latent")`, (b) the batched
   pixel path (ragged images: padded chunks, masked). A random-init model seldom opens a segment, so
   an lm_head hook scripts the schedule (T text tokens, a segment, ..., stop ids banned) for both.

1 torch thread (a shared 2-core machine): the ratios are the point, not the absolute ms. What is run (the
problems, the model, both decoding paths) is in bench/inference_paths.py; this file measures and reports.
"""
from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import tempfile
import time

import torch

from bench.common import Clock, add_common_flags, interleaved, table, write_results
from bench.inference_paths import (Bench, Problem, Schedule, build_bench, latent_batch, model_size, pixel_batch,
                                   to_problem, trajectory, trajectory_flops, vsp_record)
from bench.model import count_params, image_settings

SIDES = (3, 4, 5, 6)  # 192..384 px at 64 px per square, as in the real VSP test set
REFERENCE_SIDE = 7  # 448 px -> 256 image tokens
TARGET = 8.0
VARIANTS = ("latent", "pixel")


# ----------------------------------------------------------------------------- timing


def timed(runners: dict, repeats: int) -> tuple[dict, dict]:
    """`interleaved` (latent, pixel, latent, ...; no warm-up: done once before) over runners that fill a
    Clock; returns its timing and each variant's median phases."""
    clocks: dict[str, list] = {v: [] for v in runners}

    def call(v: str) -> None:
        clocks[v].append(Clock())
        runners[v](clocks[v][-1])

    timing = interleaved({v: functools.partial(call, v) for v in runners}, dict.fromkeys(runners, repeats),
                         no_warmup=tuple(runners))
    phases = {v: {p: statistics.median(c.ms.get(p, 0.0) for c in cs) for p in cs[0].ms} for v, cs in clocks.items()}
    return timing, phases


# ----------------------------------------------------------------------------- part 1: side by side


def compare(bench: Bench, points: list[tuple[Problem, int]], repeats: int) -> dict[tuple[int, int], dict]:
    """Both variants at each (problem, segments) point, in turn over all points and variants (so background
    load spreads over all of them). Keyed by (map side, segments)."""
    runners = {f"{v}/{p.side}/{n}": functools.partial(trajectory, bench, p, n, v) for p, n in points for v in VARIANTS}
    timing, phases = timed(runners, repeats)
    return {(p.side, n): summary({v: timing[f"{v}/{p.side}/{n}"] for v in VARIANTS},
                                 {v: phases[f"{v}/{p.side}/{n}"] for v in VARIANTS}, n) for p, n in points}


def summary(timing: dict, phases: dict, n: int) -> dict:
    """Totals, speedup with and without the render (tool) time, ms per segment of each phase."""
    latent = timing["latent"]["median_ms"]
    no_render = phases["pixel"]["total"] - phases["pixel"]["render"]
    seg = {"text": phases["latent"]["text"] / n, "latent": phases["latent"]["latent"] / n}
    seg.update({x: phases["pixel"][x] / n for x in ("render", "processor", "vision", "image_prefill")})
    seg["pixel"] = seg["render"] + seg["processor"] + seg["vision"] + seg["image_prefill"]
    return {**timing, "speedup": timing["pixel"]["median_ms"] / latent, "pixel_without_render_ms": no_render,
            "speedup_without_render": no_render / latent, "phases_ms": phases, "per_segment_ms": seg,
            "segment_ratio": (seg["text"] + seg["pixel"]) / (seg["text"] + seg["latent"])}


def slope(xs, ys) -> float:
    """Least-squares ms per extra segment."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))


# ----------------------------------------------------------------------------- part 2: throughput


def throughput(bench: Bench, problems, batch_sizes, segments: int, repeats: int) -> dict[int, dict]:
    """Both variants per batch size, interleaved; batches over 8 run once (they take minutes)."""
    sched = Schedule(round(statistics.median(len(m) for p in problems for m in p.moves)), segments,
                     round(statistics.median(len(p.answer) for p in problems)))
    out = {}
    for b in batch_sizes:
        batch = [problems[i % len(problems)] for i in range(b)]
        runners = {"latent": functools.partial(latent_batch, bench, batch, sched),
                   "pixel": functools.partial(pixel_batch, bench, batch, sched)}
        timing, phases = timed(runners, repeats if b <= 8 else 1)
        ids = {"latent": b * (segments * (sched.text_len + bench.k + 2) + sched.answer_len),
               "pixel": b * (segments * sched.text_len + sched.answer_len)}
        row = {**sched.__dict__, "image_tokens_per_sample": segments * statistics.mean(p.image_tokens for p in batch)}
        for v in VARIANTS:
            ms = timing[v]["median_ms"]
            row[v] = {**timing[v], "samples_per_s": b / ms * 1e3, "generated_ids": ids[v],
                      "generated_ids_per_s": ids[v] / ms * 1e3, "phases_ms": phases[v]}
        after = {v: timing[v]["median_ms"] - phases[v]["prompt"] for v in VARIANTS}
        row["ratio"] = timing["pixel"]["median_ms"] / timing["latent"]["median_ms"]
        row["ratio_after_prompt"] = after["pixel"] / after["latent"]
        out[b] = row
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ILVR inference on CPU: latent reasoning vs pixel-level interleaved "
                                            "reasoning on a random-init Qwen2.5-VL shaped like 7B.")
    p.add_argument("--hidden", type=int, default=384, help="LLM hidden size (7B: 3584)")
    p.add_argument("--layers", type=int, default=7, help="LLM layers (7B: 28)")
    p.add_argument("--vision-hidden", type=int, default=128, help="vision hidden size (7B: 1280)")
    p.add_argument("--vision-depth", type=int, default=8, help="vision blocks (7B: 32)")
    p.add_argument("--latent-size", type=int, default=8, help="K: latent steps per segment")
    p.add_argument("--sides", type=int, nargs="+", default=list(SIDES), help="map sides (64 px per square)")
    p.add_argument("--reference-side", type=int, default=REFERENCE_SIDE, help="map side the target is judged "
                   "at (7: 448 px, 256 image tokens)")
    p.add_argument("--segments", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--repeats", type=int, default=4, help="timed runs per variant and point")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--throughput-segments", type=int, default=2, help="segments per sample in part 2")
    p.add_argument("--throughput-repeats", type=int, default=2, help="timed batches per variant (batches > 8: 1)")
    add_common_flags(p, out="--out", out_help="write the results as JSON", threads_help=None)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (tensors are made there by default)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="model dtype (bf16 on a GPU)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s): small model, few sizes and repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vision_hidden, args.vision_depth = 128, 2, 64, 2
        args.sides, args.reference_side, args.segments, args.repeats = [3], 4, [1, 2], 1
        args.batch_sizes, args.throughput_segments, args.throughput_repeats = [1, 4], 1, 1
    return args

def print_header(args, bench: Bench, problems: dict[int, Problem]) -> None:
    params = count_params(bench.model)
    print("ILVR inference bench (CPU): latent reasoning vs pixel-level interleaved reasoning")
    print(f"  torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; no GPU")
    print(f"  model: random-init Qwen2.5-VL, {model_size(args)}, fp32, sdpa; vision full attention in blocks "
          f"{bench.model.model.visual.fullatt_block_indexes}, windows elsewhere")
    print(f"  parameters: language {params['language'] / 1e6:.2f} M, vision {params['vision'] / 1e6:.2f} M "
          f"(vision/language {params['vision'] / params['language']:.3f}; Qwen2.5-VL-7B: 0.67 B / 7.6 B = 0.088); "
          f"vocab {len(bench.tokenizer)}; K = {bench.k}; images: Qwen2.5-VL defaults {image_settings(False)}")
    for side, p in problems.items():
        print(f"  {side}x{side} map ({p.image_px} px): {p.image_tokens} image tokens, prompt "
              f"{p.prompt.input_ids.numel()} tokens, {len(p.moves)} moves, text tokens per segment "
              f"{[len(p.move(s)) for s in range(max(args.segments))]}, answer {len(p.answer)}")


def print_results(sweep: dict, marginal: dict, by_size: dict, problems: dict, flops: dict, tput: dict) -> None:
    table(["segments", "latent ms", "pixel ms", "speedup", "pixel w/o render ms", "speedup w/o render"],
          [[n, f"{r['latent']['median_ms']:.0f}", f"{r['pixel']['median_ms']:.0f}", f"{r['speedup']:.2f}x",
            f"{r['pixel_without_render_ms']:.0f}", f"{r['speedup_without_render']:.2f}x"] for n, r in sweep.items()])
    print(f"  marginal cost per segment (slope over n): latent {marginal['latent']:.0f} ms, pixel "
          f"{marginal['pixel']:.0f} ms -> {marginal['pixel'] / marginal['latent']:.2f}x")
    n = max(sweep)
    print(f"\n  per segment by image size at {n} segments, ms (text: the same in both variants)")
    rows = []
    for side in sorted(by_size):
        r, c, p = by_size[side], by_size[side]["per_segment_ms"], problems[side]
        rows.append([f"{side}x{side} {p.image_px}px", p.image_tokens] + [f"{c[x]:.0f}" for x in ("text", "latent")]
                    + [f"{c[x]:.1f}" for x in ("render", "processor")]
                    + [f"{c[x]:.0f}" for x in ("vision", "image_prefill", "pixel")]
                    + [f"{r[x]:.2f}x" for x in ("segment_ratio", "speedup", "speedup_without_render")])
    table(["map", "tokens", "text", "latent", "render", "proc", "vision", "prefill", "pixel", "seg ratio",
           f"speedup@{n}", "w/o render"], rows)
    print("  pixel = render + proc + vision + prefill; seg ratio = (text + pixel) / (text + latent): the speedup "
          "for many segments")
    f, per = flops["trajectory"], flops["per_segment"]
    print(f"  FLOPs at the reference, {n} segments: latent {f['latent'][n] / 1e9:.2f} G, pixel {f['pixel'][n] / 1e9:.2f}"
          f" G ({f['pixel'][n] / f['latent'][n]:.2f}x); per segment {per['latent'] / 1e9:.2f} G vs "
          f"{per['pixel'] / 1e9:.2f} G ({per['pixel'] / per['latent']:.1f}x), run at {flops['gflop_per_s']['latent']:.1f} "
          f"vs {flops['gflop_per_s']['pixel']:.1f} GFLOP/s")
    first = next(iter(tput.values()))
    print(f"\n2. Throughput on different maps of the reference size, per sample ({first['text_len']} text tokens + "
          f"a segment) x {first['segments']}, then {first['answer_len']} answer tokens, medians")
    table(["batch", "runs", "latent ms", "samples/s", "ids/s", "pixel ms", "samples/s", "ids/s", "prompt ms",
           "pixel/latent", "after prompt"],
          [[b, r["latent"]["runs"], f"{r['latent']['median_ms']:.0f}", f"{r['latent']['samples_per_s']:.2f}",
            f"{r['latent']['generated_ids_per_s']:.0f}", f"{r['pixel']['median_ms']:.0f}",
            f"{r['pixel']['samples_per_s']:.2f}", f"{r['pixel']['generated_ids_per_s']:.0f}",
            f"{r['pixel']['phases_ms']['prompt']:.0f}", f"{r['ratio']:.2f}x", f"{r['ratio_after_prompt']:.2f}x"]
           for b, r in tput.items()])
    print("  ids = generated ids (latent: text + start/pads/end; pixel: text, its image tokens are appended); "
          "prompt = the batch's prompt prefill (pixel run), shared by both; after prompt = ratio without it")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    n, ref = max(args.segments), args.reference_side
    order = [ref] + [s for s in args.sides if s != ref]
    records = {s: vsp_record(s, args.seed, n) for s in order}
    batch_records = [vsp_record(ref, args.seed + 1 + i, 1) for i in range(max(args.batch_sizes))]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as workdir:
        bench = build_bench(args, list(records.values()) + batch_records, workdir)
    problems = {s: to_problem(r, bench.processor) for s, r in records.items()}
    print_header(args, bench, problems)
    for v in VARIANTS:  # warm-up, once
        trajectory(bench, problems[ref], 1, v)
    print(f"\n1. One sample, whole trajectory at the reference {ref}x{ref} map ({problems[ref].image_px} px), "
          f"median of {args.repeats}, all points and variants in turn")
    points = [(problems[ref], k) for k in args.segments] + [(problems[s], n) for s in order if s != ref]
    measured = compare(bench, points, args.repeats)
    sweep = {k: measured[ref, k] for k in args.segments}
    marginal = {v: slope(list(sweep), [r[v]["median_ms"] for r in sweep.values()]) for v in VARIANTS}
    by_size = {s: measured[s, n] for s in order}
    trajectories = {v: {k: trajectory_flops(bench, problems[ref], k, v) for k in sorted({1, n})} for v in VARIANTS}
    flops = {"trajectory": trajectories,
             "per_segment": {v: (f[n] - f[1]) / max(1, n - 1) for v, f in trajectories.items()}}
    seg_ms = sweep[n]["per_segment_ms"]  # achieved FLOP rate of a segment (text + latent or pixel step)
    flops["gflop_per_s"] = {v: flops["per_segment"][v] / (seg_ms["text"] + seg_ms[v]) / 1e6 for v in VARIANTS}
    batch_problems = [to_problem(r, bench.processor) for r in batch_records]
    tput = throughput(bench, batch_problems, args.batch_sizes, args.throughput_segments, args.throughput_repeats)
    print_results(sweep, marginal, by_size, problems, flops, tput)

    met = sweep[n]["speedup"] >= TARGET
    print(f"\n  target >= {TARGET:.0f}x at {problems[ref].image_px} px, {n} segments, batch 1: "
          f"{sweep[n]['speedup']:.2f}x with render, {sweep[n]['speedup_without_render']:.2f}x without: "
          f"{'met' if met else 'NOT met'}")
    results = {"settings": {**vars(args), "tiny_size": model_size(args).__dict__, "torch": torch.__version__,
                            "image_settings": image_settings(False)},
               "parameters": count_params(bench.model), "sweep": sweep, "marginal_ms_per_segment": marginal,
               "by_size": by_size, "flops": flops, "throughput": tput, "target": TARGET, "target_met": met,
               "wall_s": time.perf_counter() - started}
    print(f"  total wall time {results['wall_s']:.0f} s")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
