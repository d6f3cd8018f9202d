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

1 torch thread (a shared 2-core machine): the ratios are the point, not the absolute ms.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from bench.model import count_params, image_settings, interleaved, record_texts
from data_pipeline.encode import encode_prompt
from data_pipeline.records import decode_image
from data_pipeline.sources.synthetic_vsp import make_record
from data_pipeline.tiny_processor import build_tiny_processor, load_processor
from data_pipeline.vsp_world import DEFAULT_CELL_PX, random_map, render, shortest_plan, simulate
from ilvr.model.build import TinySize, build_tiny_model, init_latent_embeddings
from ilvr.model.generate import generate, left_pad_prompts, stop_token_ids
from ilvr.model.inputs import embed_tokens, image_features, rope_positions, run_decoder

SIDES = (3, 4, 5, 6)  # 192..384 px at 64 px per square, as in the real VSP test set
REFERENCE_SIDE = 7  # 448 px -> 256 image tokens
TARGET = 8.0
VARIANTS = ("latent", "pixel")


# ----------------------------------------------------------------------------- problems and model


@dataclass
class Problem:
    """A VSP problem as both variants see it: its prompt, each move's text ids and the answer's."""

    side: int
    map_desc: list
    path: list  # the player's square after each move (start first)
    prompt: Any  # EncodedPrompt
    moves: list[list[int]]
    answer: list[int]

    def move(self, s: int) -> list[int]:
        return self.moves[s % len(self.moves)]  # past the plan's end: its moves again

    def state(self, s: int) -> tuple[int, int]:
        return self.path[s % len(self.moves) + 1]

    @property
    def image_px(self) -> int:
        return self.side * DEFAULT_CELL_PX

    @property
    def image_tokens(self) -> int:
        """Merged tokens of one map image (every state of a map has the input image's size)."""
        return int(self.prompt.image_grid_thw[0].prod()) // 4


def vsp_record(side: int, seed: int, min_moves: int):
    """A synthetic VSP record on a side x side map, whose plan has >= min_moves moves if a draw allows."""
    rng = random.Random(f"bench-inference/{seed}/{side}")
    best = random_map(rng, side)
    for _ in range(200):
        if len(shortest_plan(best)) >= min_moves:
            break
        best = max(best, random_map(rng, side), key=lambda grid: len(shortest_plan(grid)))
    return make_record(f"bench-{side}-{seed}", best, "vsp", DEFAULT_CELL_PX)


def to_problem(record, processor) -> Problem:
    def ids(text: str) -> list[int]:  # as encode_record tokenizes text steps
        return processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    texts = [s.text for s in record.steps if s.kind == "text"]
    map_desc = record.meta["map_desc"]
    return Problem(len(map_desc), map_desc, simulate(map_desc, shortest_plan(map_desc)).path,
                   encode_prompt(record, processor), [ids(t) for t in texts[:-1]], ids(texts[-1]))


@dataclass
class Bench:
    model: Any
    processor: Any
    tokenizer: Any
    latent_ids: Any
    k: int


def model_size(args):
    """TinySize with 7B's width ratios: MLP 18944/3584 x hidden, heads of 128 (vision: of 64), one KV head."""
    return TinySize(hidden=args.hidden, intermediate=round(args.hidden * 18944 / 3584), layers=args.layers,
                    heads=max(1, args.hidden // 128), kv_heads=1, vision_depth=args.vision_depth,
                    vision_hidden=args.vision_hidden, vision_intermediate=round(args.vision_hidden * 3420 / 1280),
                    vision_heads=max(1, args.vision_hidden // 64))


def build_bench(args, records, workdir: str) -> Bench:
    """Tiny processor (default image settings) trained on the records' text, and the model on it."""
    proc_dir = build_tiny_processor(f"{workdir}/processor", record_texts(records) * 4, **image_settings(False))
    processor, latent_ids = load_processor(proc_dir)
    model = build_tiny_model(processor.tokenizer, processor.image_processor, model_size(args), seed=args.seed)
    init_latent_embeddings(model, processor.tokenizer, latent_ids)
    model = model.to(getattr(args, "device", "cpu"), torch.bfloat16 if getattr(args, "dtype", "fp32") == "bf16"
                     else torch.float32)
    # tiny_config gives every vision block full attention; 7B has it in blocks 7, 15, 23, 31 only
    depth = args.vision_depth
    model.model.visual.fullatt_block_indexes = [i for i in range(depth) if (i + 1) % 8 == 0 or i == depth - 1]
    return Bench(model.eval(), processor, processor.tokenizer, latent_ids, args.latent_size)


# ----------------------------------------------------------------------------- decoding with the KV cache


@dataclass
class Decoding:
    """A batch being decoded: what generation keeps (cache, 2-D mask, next rope position, newest final
    hidden state per row), plus what was fed (ids and positions per call) and the images' grids."""

    cache: Any
    mask: torch.Tensor  # [B, cache length], 0 on left padding and on padded image slots
    next_pos: torch.Tensor  # [B]
    last: torch.Tensor  # [B, H]
    fed: list = field(default_factory=list)
    grids: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class Clock:
    """Wall time per phase, summed over a trajectory's segments."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # phases end when the device is done, not when the launch returns
            self.ms[phase] += (time.perf_counter() - t0) * 1e3


def start(model, prompts, pad_id: int) -> Decoding:
    """Prompt prefill, left padded and positioned as `generate` does."""
    batch = left_pad_prompts(prompts, pad_id, model.device)
    positions, deltas = rope_positions(model, batch)
    cache = DynamicCache(config=model.config.get_text_config())
    hidden, cache = run_decoder(model, embed_tokens(model, batch), positions, batch["attention_mask"],
                                cache=cache, use_cache=True)
    mask = batch["attention_mask"]
    return Decoding(cache, mask, mask.sum(1) + deltas.view(-1).to(mask.device), hidden[:, -1],
                    [(batch["input_ids"], positions)], [batch["image_grid_thw"]])


def feed(model, st: Decoding, embeds, ids, positions=None, new_mask=None, last_index=None) -> None:
    """Run the decoder on new inputs with the cache (default: one text position per row)."""
    b, n = ids.shape
    if positions is None:
        positions = (st.next_pos[:, None] + torch.arange(n)).unsqueeze(0).expand(3, -1, -1)
    new_mask = torch.ones_like(ids) if new_mask is None else new_mask
    st.mask = torch.cat([st.mask, new_mask], dim=1)
    hidden, st.cache = run_decoder(model, embeds, positions, st.mask, cache=st.cache, use_cache=True)
    st.last = hidden[:, -1] if last_index is None else hidden[torch.arange(b), last_index]
    st.next_pos = positions.masked_fill(new_mask[None] == 0, -1).amax(dim=(0, 2)) + 1
    st.fed.append((ids, positions))


def pick(model, st: Decoding, banned=None) -> torch.Tensor:
    """Greedy choice from the newest states, as each generation step makes it. [B]."""
    logits = model.lm_head(st.last).float()
    if banned is not None:
        logits = logits.index_fill(-1, banned, float("-inf"))
    return logits.argmax(-1)


def decode_text(model, st: Decoding, count: int, script=None, banned=None) -> None:
    """`count` text steps: lm_head + argmax, then feed the scripted id ([B, count]) or the greedy one."""
    embedding = model.get_input_embeddings()
    for t in range(count):
        token = pick(model, st, banned)
        column = (token if script is None else script[:, t])[:, None]
        feed(model, st, embedding(column), column)


def latent_segment(bench: Bench, st: Decoding) -> None:
    """<|latent_start|>, K steps fed with the newest final hidden state, <|latent_end|>: K+2 decoder calls."""
    model, ids = bench.model, bench.latent_ids
    embedding = model.get_input_embeddings()
    column = lambda token: torch.full((st.last.shape[0], 1), token, dtype=torch.long)
    pick(model, st)
    feed(model, st, embedding(column(ids.start)), column(ids.start))
    for _ in range(bench.k):
        pick(model, st)
        feed(model, st, st.last[:, None], column(ids.pad))
    pick(model, st)
    feed(model, st, embedding(column(ids.end)), column(ids.end))


def image_chunk(config, grid: torch.Tensor, merge: int, pad_id: int) -> dict:
    """<|vision_start|> + image tokens + <|vision_end|> per row, right padded: a batch for `rope_positions`."""
    counts = (grid.prod(-1) // merge**2).tolist()
    ids = torch.full((len(counts), max(counts) + 2), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(counts):
        ids[row, :n + 2] = torch.tensor([config.vision_start_token_id] + [config.image_token_id] * n
                                        + [config.vision_end_token_id])
        mask[row, :n + 2] = 1
    return {"input_ids": ids, "attention_mask": mask, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == config.image_token_id).long()}


def image_segment(bench: Bench, st: Decoding, images, clock: Clock) -> None:
    """Image processor -> vision encoder + merger -> the image's tokens prefilled into the cache in one call."""
    model = bench.model
    with clock("processor"):
        out = bench.processor.image_processor(images=images, return_tensors="pt")
        pixels = out["pixel_values"].to(model.device, model.dtype)
        grid = out["image_grid_thw"].long().to(model.device)
    with clock("vision"):
        feats = image_features(model, pixels, grid)
    with clock("image_prefill"):
        pick(model, st)
        chunk = image_chunk(model.config, grid, bench.processor.image_processor.merge_size, bench.tokenizer.pad_token_id)
        embeds = model.get_input_embeddings()(chunk["input_ids"])
        embeds = embeds.masked_scatter(chunk["mm_token_type_ids"].bool()[..., None], feats.to(embeds.dtype))
        positions, _ = rope_positions(model, chunk)  # the chunk alone starts at 0: shift to each row's next
        positions = positions + st.next_pos.view(1, -1, 1)
        mask = chunk["attention_mask"]
        feed(model, st, embeds, chunk["input_ids"], positions, mask, last_index=mask.sum(1) - 1)
        st.grids.append(grid)


def render_state(problem: Problem, s: int):
    """The tool of the pixel path: the map after move s, drawn (PNG) and decoded for the processor."""
    return decode_image(render(problem.map_desc, problem.state(s), DEFAULT_CELL_PX))


@torch.no_grad()
def trajectory(bench: Bench, problem: Problem, n: int, variant: str, clock: Clock | None = None) -> Decoding:
    """The scripted trajectory with n segments, one sample; wall time per phase into `clock`."""
    model, clock = bench.model, clock or Clock()
    t0 = time.perf_counter()
    with clock("prompt"):
        st = start(model, [problem.prompt], bench.tokenizer.pad_token_id)
    for s in range(n):
        with clock("text"):
            decode_text(model, st, len(problem.move(s)), torch.tensor([problem.move(s)]))
        if variant == "latent":
            with clock("latent"):
                latent_segment(bench, st)
        else:
            with clock("render"):
                image = render_state(problem, s)
            image_segment(bench, st, [image], clock)
    with clock("answer"):
        decode_text(model, st, len(problem.answer), torch.tensor([problem.answer]))
        pick(model, st)  # the step that ends the answer
    clock.ms["total"] = (time.perf_counter() - t0) * 1e3
    return st


def trajectory_flops(bench: Bench, problem: Problem, n: int, variant: str) -> float:
    """Counted by torch (matmuls, attention, convolutions): what a compute-bound device would pay."""
    with FlopCounterMode(display=False) as counter:
        trajectory(bench, problem, n, variant)
    return float(counter.get_total_flops())


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


@dataclass(frozen=True)
class Schedule:
    """Per sample: `segments` x (text_len text tokens + a segment), then answer_len tokens."""

    text_len: int
    segments: int
    answer_len: int


@contextlib.contextmanager
def scripted_schedule(bench: Bench, sched: Schedule):
    """lm_head hook: stop ids never win; step text_len of each (text_len + K + 2)-step period opens a latent
    segment (generate forces the K pads and the end). Yields a dict that gets the time of the first call
    (the prompt prefill is done then)."""
    stops = torch.tensor(sorted(stop_token_ids(bench.model, bench.tokenizer)))
    period, calls, seen = sched.text_len + bench.k + 2, [0], {}

    def hook(module, args, out):
        seen.setdefault("first_call", time.perf_counter())
        out = out.clone()
        out[..., stops] -= 1e4
        if calls[0] < sched.segments * period and calls[0] % period == sched.text_len:
            out[..., bench.latent_ids.start] += 1e4
        calls[0] += 1
        return out

    handle = bench.model.lm_head.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def latent_batch(bench: Bench, problems, sched: Schedule, clock: Clock) -> list:
    """`generate(mode="latent")` on the prompts under the scripted schedule."""
    new_tokens = sched.segments * (sched.text_len + bench.k + 2) + sched.answer_len
    t0 = time.perf_counter()
    with scripted_schedule(bench, sched) as seen:
        results = generate(bench.model, [p.prompt for p in problems], bench.tokenizer, bench.latent_ids, bench.k,
                           mode="latent", max_new_tokens=new_tokens)
    clock.ms["prompt"] = (seen["first_call"] - t0) * 1e3
    if any(r.num_latent_segments != sched.segments or len(r.token_ids) != new_tokens for r in results):
        raise RuntimeError("the scripted schedule did not give every row its latent segments")
    return results


@torch.no_grad()
def pixel_batch(bench: Bench, problems, sched: Schedule, clock: Clock) -> Decoding:
    """The batched pixel path on the same schedule: greedy text (stop and latent ids banned), then each row's
    next map image appended (rows of different sizes: padded chunks, masked)."""
    model = bench.model
    banned = torch.tensor(sorted(stop_token_ids(model, bench.tokenizer) | set(bench.latent_ids.as_tuple())))
    with clock("prompt"):
        st = start(model, [p.prompt for p in problems], bench.tokenizer.pad_token_id)
    for s in range(sched.segments):
        with clock("text"):
            decode_text(model, st, sched.text_len, banned=banned)
        with clock("render"):
            images = [render_state(p, s) for p in problems]
        image_segment(bench, st, images, clock)
    with clock("text"):
        decode_text(model, st, sched.answer_len, banned=banned)
        pick(model, st, banned)
    return st


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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="PATH", help="write the results as JSON")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (tensors are made there by default)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="model dtype (bf16 on a GPU)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 60 s): small model, few sizes and repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vision_hidden, args.vision_depth = 128, 2, 64, 2
        args.sides, args.reference_side, args.segments, args.repeats = [3], 4, [1, 2], 1
        args.batch_sizes, args.throughput_segments, args.throughput_repeats = [1, 4], 1, 1
    return args


def table(header: list[str], rows: list[list]) -> None:
    """Right-aligned columns; numbers are formatted by the caller."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  " + " ".join(f"{x!s:>{w}}" for x, w in zip(row, widths)))


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
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"  results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
