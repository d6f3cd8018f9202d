"""What bench/inference.py runs: the VSP problems, the model, and the two ways of decoding a reasoning step.

(a) latent: <|latent_start|> + K fed-back final hidden states + <|latent_end|>, with the KV cache;
(b) pixel: the map after the move drawn, image processor -> vision encoder -> <|vision_start|> + image tokens +
<|vision_end|> prefilled into the cache in one call, at the mrope positions `get_rope_index` gives them in the
whole sequence. One sample's scripted trajectory (`trajectory`), and the batched paths of the throughput part
(`latent_batch`: `generate(mode="latent")` under a scripted schedule; `pixel_batch`: ragged images, padded).
Every step pays lm_head + argmax as generation does (the script replaces its choice). Phases are timed with
a bench.common.Clock; bench/inference.py measures and reports.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from bench.common import Clock
from bench.model import image_settings, record_texts
from data_pipeline.encode import encode_prompt
from data_pipeline.records import decode_image
from data_pipeline.sources.synthetic_vsp import make_record
from data_pipeline.tiny_processor import build_tiny_processor, load_processor
from data_pipeline.vsp_world import DEFAULT_CELL_PX, random_map, render, shortest_plan, simulate
from ilvr.model.build import TinySize, build_tiny_model, init_latent_embeddings
from ilvr.model.generate import generate, left_pad_prompts, stop_token_ids
from ilvr.model.inputs import embed_tokens, image_features, rope_positions, run_decoder


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


# ----------------------------------------------------------------------------- the batched paths (throughput)


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
