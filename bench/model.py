"""Model-side cost of ILVR training on CPU: teacher targets, and a stage-2 step against its alternatives.

    python -m bench.model [--hidden 256] [--layers 4] [--latent-size 8] [--batch-size 4]
                          [--stage2-segments 3] [--repeats 5] [--naive-repeats 2] [--json PATH]

What it measures, side by side in one run, on one random-init Qwen2.5-VL of the real class
(`build_tiny_model`; default TinySize(hidden=256, intermediate=688, layers=4, heads=8,
kv_heads=4, vision_depth=2, vision_hidden=128, vision_intermediate=256, vision_heads=4),
fp32, SDPA, vision frozen as in training) and one batch of VSP-like records (one input map
and one helper map per latent segment, 3x3..6x6 squares at 64 px: 192..384 px images, read
with Qwen2.5-VL's default image settings, so a 384 px map is 196 image tokens):

1. Teacher cost (stage-1 targets), for 1, 3 and 6 latent segments per sample:
   * ours: `select_targets`, ONE teacher pass per batch whatever the number of segments;
   * reference: the public release's way, one full teacher forward (vision tower on the
     input images + the whole decoder) PER latent segment index t, each followed by segment
     t's query and selection (`reference_select_targets` below). The helper-image candidates
     are encoded once, as in ours, so the difference is the repeated forward alone.
   Both give the same targets (checked: max |difference| printed).
2. One training step (forward + backward) on the same batch, 3 segments per sample by default:
   * stage 2, `stage2_loss`: latents fed back through the KV cache (text chunks + K
     single-position steps per segment, about one pass of compute);
   * stage 2 naive, `naive_stage2_loss`: the Coconut-style n+1 full passes (n = pads per row);
   * stage 1, `stage1_loss`: teacher targets (separate copy of the student, no grad) + one
     injected student pass;
   * for context, one plain student pass (forward + backward, text CE, nothing fed back).
   Ratios stage2/naive and stage2/stage1 (the target is stage2 <= 1.5x stage1), and what each
   single-position latent step adds over the plain pass. The naive step (n+1 passes) is not
   warmed up and runs `--naive-repeats` times only.

Why: stage 1 is advertised as one teacher pass per batch instead of one per segment, and
stage 2 as costing about one forward pass; this shows both on a model big enough that
attention and MLPs (not Python) do most of the work. On CPU a stage-2 step pays a fixed
per-call cost for each of its sum_t K_t single-token decoder calls; that overhead shrinks
relative to the compute as the model and the sequences grow (`--hidden`, `--layers`).

Timing: one thread (torch.set_num_threads(1)) for stable numbers on a shared machine; each
comparison warms every variant up once, then runs them interleaved (A, B, A, B, ...) so
background load hits them alike, and reports the median (and min/max) in milliseconds.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import add_common_flags, interleaved, write_results

IMAGE_SIDES = (3, 4, 5, 6)  # squares per side -> 192, 256, 320, 384 px at 64 px per square
TEACHER_SEGMENTS = (1, 3, 6)
STAGE2_TARGET_RATIO = 1.5


# ----------------------------------------------------------------------------- data


def build_record(i: int, n_segments: int, seed: int = 0):
    """A VSP-like record with exactly `n_segments` latent steps: one input map (192..384 px), one text step
    per move, each followed by a latent step whose helper image is the map after that move."""
    from data_pipeline.records import ImageRef, Record, Step
    from data_pipeline.sources.synthetic_vsp import QUESTION
    from data_pipeline.vsp_world import DEFAULT_CELL_PX, random_map, render_states, shortest_plan, simulate

    rng = random.Random(f"bench-model/{seed}/{i}")
    side = IMAGE_SIDES[i % len(IMAGE_SIDES)]
    map_desc = random_map(rng, side)
    plan = shortest_plan(map_desc)
    path = simulate(map_desc, plan).path
    images = render_states(map_desc, path, DEFAULT_CELL_PX)
    steps = []
    for t in range(n_segments):
        k = t % len(plan)
        (r0, c0), (r1, c1) = path[k], path[k + 1]
        steps.append(Step.of_text(f"Move {plan[k]}: from ({r0},{c0}) to ({r1},{c1}), safe ice."))
        steps.append(Step.of_latent(ImageRef(data=images[k + 1])))
    answer = ",".join(plan)
    steps.append(Step.of_text(f"The player reached the goal. The plan is \\boxed{{{answer}}}."))
    return Record(id=f"bench-{seed}-{i}", task="vsp", question=QUESTION, images=[ImageRef(data=images[0])],
                  steps=steps, answer=answer)


def record_texts(records) -> list[str]:
    from data_pipeline.records import IMAGE_PLACEHOLDER

    texts = []
    for r in records:
        texts.append(r.question.replace(IMAGE_PLACEHOLDER, " "))
        texts += [s.text for s in r.steps if s.kind == "text"]
    return texts


def image_settings(tiny: bool) -> dict[str, int]:
    """Qwen2.5-VL's default image settings (transformers' Qwen2-VL image processor class), or the tiny ones."""
    if tiny:
        from data_pipeline.tiny_processor import TINY_MAX_PIXELS, TINY_MIN_PIXELS, TINY_PATCH_SIZE

        return {"patch_size": TINY_PATCH_SIZE, "merge_size": 2, "temporal_patch_size": 2,
                "min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS}
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls

    return {"patch_size": int(cls.patch_size), "merge_size": int(cls.merge_size),
            "temporal_patch_size": int(cls.temporal_patch_size),
            "min_pixels": int(cls.size["shortest_edge"]), "max_pixels": int(cls.size["longest_edge"])}


def make_batch(processor, latent_ids, batch_size: int, n_segments: int, latent_size: int, seed: int) -> dict:
    """A right-padded batch of `batch_size` records with `n_segments` latent segments each."""
    from data_pipeline.collate import collate_padded
    from data_pipeline.encode import encode_record

    samples = [encode_record(build_record(i, n_segments, seed), processor, latent_ids, latent_size, 1 << 20)
               for i in range(batch_size)]
    return collate_padded(samples, processor.tokenizer.pad_token_id)


def batch_shape(batch: dict) -> dict[str, Any]:
    lengths = batch["attention_mask"].sum(1).tolist()
    merge = 4  # spatial merge 2x2
    return {
        "tokens_per_sample": lengths,
        "tokens_mean": statistics.mean(lengths),
        "padded_length": int(batch["input_ids"].shape[1]),
        "image_tokens_per_sample": batch["mm_token_type_ids"].sum(1).tolist(),
        "helper_tokens_per_image": (batch["helper_image_grid_thw"].prod(-1) // merge).tolist(),
        "segments": int(batch["latent_segments"].shape[0]),
    }


# ----------------------------------------------------------------------------- the reference teacher


@torch.no_grad()
def reference_select_targets(teacher, batch: dict, loss_cfg, latent_size: int):
    """Stage-1 targets the reference release's way: for each segment index t, one FULL teacher forward over the
    batch (vision tower on the input images + decoder), then the user summary, the context of segment t and its
    selection from that pass. Same queries and selection rule as `select_targets` (loss.query_parts,
    loss.score_norm, loss.target_order; loss.change_weight must be 0, the method's default), so the same targets
    (tests/test_selection.py checks it)."""
    from ilvr.model.selection import (
        Selection, coverage_picks, gather_picks, helper_candidates, prompt_ends, prompt_image_weights, sample_spans,
        segment_order, span_means, teacher_states, unit,
    )

    if loss_cfg.change_weight:
        raise ValueError("reference_select_targets: loss.change_weight > 0 is not the method; it has no reference")
    device = batch["input_ids"].device
    seg = batch["latent_segments"].to(device)
    cands, cmask = helper_candidates(teacher, batch, loss_cfg.max_candidates)  # once, as in ours
    cmask = cmask.to(device)
    rows, starts, ends = sample_spans(batch)
    prompt_end = prompt_ends(batch["labels"].to(device), rows, starts, ends)
    is_image = batch["mm_token_type_ids"].to(device).bool()
    seg_row, first_pad, size, helper = seg.unbind(1)
    inside = (rows[None] == seg_row[:, None]) & (starts[None] <= first_pad[:, None]) & (first_pad[:, None] < ends[None])
    owner = inside.float().argmax(1)
    ordinal, prev, prev_end = segment_order(owner, first_pad, size)
    use = {q.strip() for q in loss_cfg.query_parts.split(",")}

    n_seg, hidden = seg.shape[0], teacher.config.text_config.hidden_size
    targets = torch.zeros(n_seg, latent_size, hidden, dtype=cands.dtype, device=device)
    counts = torch.zeros(n_seg, dtype=torch.long, device=device)
    max_prob = torch.zeros(n_seg, device=device)
    picked_mean = torch.zeros(n_seg, hidden, device=device)
    for t in range(int(ordinal.max()) + 1 if n_seg else 0):
        final, layer_input, positions, _ = teacher_states(teacher, batch)  # the repeated full forward
        text = span_means(final, rows, starts, prompt_end, weights=~is_image)
        weights, (pr, pc) = prompt_image_weights(teacher, layer_input, positions, rows, starts, prompt_end, is_image)
        image = (weights[..., None] * final[pr, pc].float()).sum(1)
        has_image = (is_image[pr, pc] & (pc < prompt_end[:, None])).any(1)
        user = unit(torch.where(has_image[:, None], (text + image) / 2, text))
        idx = (ordinal == t).nonzero().squeeze(1)
        begin = torch.where(ordinal[idx] > 0, prev_end[idx], prompt_end[owner[idx]])
        context = unit(span_means(final, seg_row[idx], begin, first_pad[idx]))
        parts = ([user[owner[idx]]] if "user" in use else []) + ([context] if "context" in use else [])
        if t > 0 and "previous" in use:
            parts.append(unit(picked_mean[prev[idx]]))
        query = torch.stack(parts).mean(0) if parts else torch.zeros(idx.numel(), hidden, device=device)
        h = helper[idx]
        picks, cnt, mp = coverage_picks(cands[h], cmask[h], query, size[idx], loss_cfg.temperature,
                                        loss_cfg.coverage_p, latent_size, loss_cfg.score_norm, loss_cfg.target_order,
                                        None)
        tg = gather_picks(cands[h], picks)
        targets[idx], counts[idx], max_prob[idx] = tg.to(targets.dtype), cnt, mp
        picked_mean[idx] = tg.float().sum(1) / cnt[:, None]
    return Selection(targets, counts, max_prob, cmask[helper].sum(1))


def step_fn(model, loss: Callable[[], Any]) -> Callable[[], None]:
    """Forward + backward of `loss()`, gradients cleared after each step."""
    def run() -> None:
        loss().loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def plain_pass(model, batch: dict):
    """One ordinary forward of the student on the batch (pads keep their token embedding) with text CE:
    the cost unit that stage 1's student pass and stage 2 are compared with."""
    from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
    from ilvr.model.stage1 import Stage1Output, shifted_ce

    positions, _ = rope_positions(model, batch)
    hidden, _ = run_decoder(model, embed_tokens(model, batch), positions, batch.get("attention_mask"))
    ce = shifted_ce(model, hidden, batch["labels"])
    return Stage1Output(ce, ce, ce * 0.0)


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"total": total, "trainable": trainable, "vision": vision, "language": total - vision}


def fmt_ms(row: dict[str, float]) -> str:
    return f"{row['median_ms']:9.1f} ms  (min {row['min_ms']:.1f}, max {row['max_ms']:.1f}, n={row['runs']})"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ILVR model-side cost on CPU: teacher targets and stage-2 vs stage-1 "
                                            "steps on a random-init Qwen2.5-VL.")
    p.add_argument("--hidden", type=int, default=256, help="LLM hidden size (intermediate = round(2.6875*hidden))")
    p.add_argument("--intermediate", type=int, default=0, help="LLM MLP size (0: 688/256 x hidden)")
    p.add_argument("--layers", type=int, default=4, help="LLM decoder layers")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--latent-size", type=int, default=8, help="K: pads per latent segment")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--stage2-segments", type=int, default=3, help="latent segments per sample in part 2")
    p.add_argument("--teacher-segments", type=int, nargs="+", default=list(TEACHER_SEGMENTS))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    p.add_argument("--naive-repeats", type=int, default=2, help="timed runs of the naive n+1-pass stage 2 "
                   "(0: skip it; it holds n+1 passes of activations, ~GBs beyond the defaults)")
    p.add_argument("--tiny-images", action="store_true", help="tiny image settings (<= 240x240 px) instead of "
                                                             "Qwen2.5-VL's defaults")
    p.add_argument("--train-vision", action="store_true", help="do not freeze the vision tower (training freezes it)")
    add_common_flags(p, threads_help="torch threads (1: stable numbers on a shared machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from data_pipeline.tiny_processor import build_tiny_processor, load_processor
    from ilvr.config import LossConfig
    from ilvr.model.build import TinySize, build_tiny_model, freeze_vision, init_latent_embeddings
    from ilvr.model.selection import select_targets
    from ilvr.model.stage1 import stage1_loss
    from ilvr.model.stage2 import naive_stage2_loss, stage2_loss

    started = time.perf_counter()
    k = args.latent_size
    seg_counts = sorted(set(args.teacher_segments) | {args.stage2_segments})
    settings = image_settings(args.tiny_images)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as workdir:
        corpus = record_texts([build_record(i, max(seg_counts), args.seed) for i in range(args.batch_size)])
        proc_dir = build_tiny_processor(os.path.join(workdir, "processor"), corpus * 4, **settings)
        processor, latent_ids = load_processor(proc_dir)
    intermediate = args.intermediate or round(args.hidden * 688 / 256)
    size = TinySize(hidden=args.hidden, intermediate=intermediate, layers=args.layers, heads=args.heads,
                    kv_heads=args.kv_heads, vision_depth=2, vision_hidden=128, vision_intermediate=256, vision_heads=4)
    student = build_tiny_model(processor.tokenizer, processor.image_processor, size, seed=args.seed)
    init_latent_embeddings(student, processor.tokenizer, latent_ids)
    if not args.train_vision:
        freeze_vision(student)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()
    loss_cfg = LossConfig(temperature=0.1)
    batches = {n: make_batch(processor, latent_ids, args.batch_size, n, k, args.seed) for n in seg_counts}
    params = count_params(student)

    print("ILVR model bench (CPU)")
    print(f"  torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"  model: random-init Qwen2.5-VL, {size}, fp32, sdpa; vocab {len(processor.tokenizer)}")
    print(f"  parameters: {params['total'] / 1e6:.2f} M total ({params['language'] / 1e6:.2f} M language, "
          f"{params['vision'] / 1e6:.2f} M vision), {params['trainable'] / 1e6:.2f} M trainable "
          f"(vision {'trained' if args.train_vision else 'frozen'})")
    print(f"  K={k}, batch size {args.batch_size}, images {'tiny settings' if args.tiny_images else 'Qwen2.5-VL defaults'}"
          f" (min {settings['min_pixels']} / max {settings['max_pixels']} px), maps 192..384 px")
    print(f"  loss: {loss_cfg}")
    print(f"  repeats: {args.repeats} (naive stage 2: {args.naive_repeats}), median reported, variants interleaved")
    for n in seg_counts:
        shape = batch_shape(batches[n])
        print(f"  batch with {n} segment(s)/sample: tokens/sample {shape['tokens_per_sample']} (padded to "
              f"{shape['padded_length']}), input-image tokens {shape['image_tokens_per_sample']}, "
              f"helper tokens/image {sorted(set(shape['helper_tokens_per_image']))}")

    results: dict[str, Any] = {
        "settings": {**vars(args), "tiny_size": size.__dict__, "loss": loss_cfg.__dict__, "image_settings": settings,
                     "torch": torch.__version__, "vocab": len(processor.tokenizer)},
        "parameters": params,
        "batches": {str(n): batch_shape(batches[n]) for n in seg_counts},
        "teacher": {},
    }

    print("\n1. Teacher targets (no grad): ours = one teacher pass per batch; reference = one full pass per segment")
    print(f"  {'segments/sample':>15} {'ours ms':>10} {'reference ms':>13} {'ref/ours':>9} {'max |diff|':>11}")
    for n in args.teacher_segments:
        batch = batches[n]
        ours, ref = select_targets(teacher, batch, loss_cfg, k), reference_select_targets(teacher, batch, loss_cfg, k)
        diff = float((ours.targets - ref.targets).abs().max())
        same_counts = bool(torch.equal(ours.counts, ref.counts))
        timing = interleaved({"ours": lambda b=batch: select_targets(teacher, b, loss_cfg, k),
                              "reference": lambda b=batch: reference_select_targets(teacher, b, loss_cfg, k)},
                             {"ours": args.repeats, "reference": args.repeats})
        ratio = timing["reference"]["median_ms"] / timing["ours"]["median_ms"]
        print(f"  {n:>15} {timing['ours']['median_ms']:>10.1f} {timing['reference']['median_ms']:>13.1f} "
              f"{ratio:>8.2f}x {diff:>11.2e}{'' if same_counts else '  (K* differ!)'}")
        results["teacher"][str(n)] = {**timing, "ratio_reference_over_ours": ratio, "max_abs_diff": diff,
                                      "same_counts": same_counts}

    n = args.stage2_segments
    batch = batches[n]
    print(f"\n2. One training step (forward + backward), {n} segment(s)/sample, {n * k} latent pads per sample")
    with torch.no_grad():
        s2 = stage2_loss(student, batch)
        naive = naive_stage2_loss(student, batch) if args.naive_repeats else None
    calls = int(s2.stats["decoder_calls"])
    check = "naive skipped (--naive-repeats 0)" if naive is None else (
        f"naive: {int(naive.stats['decoder_calls'])} full passes; |ce stage2 - naive| = "
        f"{abs(float(s2.ce) - float(naive.ce)):.2e}")
    print(f"  stage2 decoder calls: {calls} ({calls - n * k} text chunks + {n * k} single-position latent steps); {check}")
    variants = {
        "stage1": step_fn(student, lambda: stage1_loss(student, teacher, batch, loss_cfg, k)),
        "stage2": step_fn(student, lambda: stage2_loss(student, batch)),
        "naive_stage2": step_fn(student, lambda: naive_stage2_loss(student, batch)),
        "plain_pass": step_fn(student, lambda: plain_pass(student, batch)),
    }
    repeats = {"stage1": args.repeats, "stage2": args.repeats, "naive_stage2": args.naive_repeats,
               "plain_pass": args.repeats}
    if not args.naive_repeats:  # the naive step keeps n+1 passes of activations: too big for large settings
        del variants["naive_stage2"], repeats["naive_stage2"]
    # the naive step is n+1 passes long: it warms itself up, so it is not run an extra time
    timing = interleaved(variants, repeats, no_warmup=("naive_stage2",))
    labels = {"stage1": "stage 1 (teacher targets + student pass)", "stage2": "stage 2 (KV cache)",
              "naive_stage2": "stage 2 naive (n+1 passes)", "plain_pass": "context: one plain student pass"}
    for name, label in labels.items():
        if name in timing:
            print(f"  {label:>41}: {fmt_ms(timing[name])}")
    s2_ms, s1_ms, one_ms = (timing[x]["median_ms"] for x in ("stage2", "stage1", "plain_pass"))
    nv_ms = timing["naive_stage2"]["median_ms"] if "naive_stage2" in timing else float("nan")
    verdict = "meets" if s2_ms / s1_ms <= STAGE2_TARGET_RATIO else "misses"
    if "naive_stage2" in timing:
        print(f"  stage2 / naive  = {s2_ms / nv_ms:.3f}  (naive is {nv_ms / s2_ms:.1f}x slower)")
    print(f"  stage2 / stage1 = {s2_ms / s1_ms:.2f}  ({verdict} the <= {STAGE2_TARGET_RATIO}x target)")
    print(f"  stage2 / plain pass = {s2_ms / one_ms:.2f}: the {n * k} single-position latent steps (and chunking) add "
          f"{(s2_ms - one_ms) / (n * k):.1f} ms each, forward + backward")
    results["step"] = {**timing, "segments_per_sample": n, "stage2_decoder_calls": calls,
                       "naive_decoder_calls": None if naive is None else int(naive.stats["decoder_calls"]),
                       "ratio_stage2_over_naive": s2_ms / nv_ms if "naive_stage2" in timing else None,
                       "ratio_stage2_over_stage1": s2_ms / s1_ms,
                       "ratio_stage2_over_plain_pass": s2_ms / one_ms,
                       "target_ratio": STAGE2_TARGET_RATIO, "meets_target": s2_ms / s1_ms <= STAGE2_TARGET_RATIO}
    results["wall_s"] = time.perf_counter() - started
    print(f"\n  total wall time {results['wall_s']:.0f} s")
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
