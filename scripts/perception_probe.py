"""Can a tiny Qwen2.5-VL trained from scratch read WHERE things are on a VSP map? A one-process probe.

    python scripts/perception_probe.py --task row --freeze-vision [--system-prompt "..."] [--text-before-image N]

Trains the method table's tiny model (real Qwen2.5-VL classes, random init) on one question about
3x3 synthetic maps and prints, on 256 held-out maps, the teacher-forced accuracy of the answer's
digits (chance ~1/3 for a row or column). No DeepSpeed, no shards: the fastest way to see whether
a setting lets image positions be read at all. docs/method.md ("What a from-scratch model needs")
lists what it measured and why the method table freezes the tower and puts the map first.

Tasks (the question always shows the map; the answer is one sentence):
  row     "The player is in row R."            (where: one position)
  locate  "The player is at (R,C). The goal is at (R,C)."   (synthetic_vsp's `locate` style)
  count   "There are N holes."                 (what: content only, no position)
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.collate import collate_padded  # noqa: E402
from data_pipeline.encode import encode_record  # noqa: E402
from data_pipeline.records import ImageRef, Record, Step  # noqa: E402
from data_pipeline.sources import synthetic_vsp  # noqa: E402
from data_pipeline.tiny_processor import DEFAULT_SYSTEM_PROMPT, build_tiny_processor, load_processor  # noqa: E402
from data_pipeline.vsp_world import HOLE, START, find, random_map, render_states  # noqa: E402
from ilvr.model.build import TinySize, build_tiny_model, freeze_vision  # noqa: E402

FILLER = "The lake is cold and the wind is strong today. "  # words placed before the map by --text-before-image


def answer(task: str, map_desc: list[list[int]]) -> str:
    if task == "row":
        return f"The player is in row {find(map_desc, START)[0]}."
    if task == "count":
        return f"There are {sum(v == HOLE for row in map_desc for v in row)} holes."
    return synthetic_vsp.locations(map_desc)


def records(task: str, n: int, seed: int, size: int, text_before_image: int) -> list[Record]:
    """`n` maps (the synthetic source's generator), each asked `task` with the map first in the question."""
    filler = (FILLER * (1 + text_before_image // 8)).split()[:text_before_image]
    question = (" ".join(filler) + " " if filler else "") + synthetic_vsp.LOCATE_QUESTION
    out = []
    for i in range(n):
        map_desc = random_map(random.Random(f"perception-probe/{seed}/{i}"), size)
        image = render_states(map_desc, [find(map_desc, START)])[0]
        text = answer(task, map_desc)
        out.append(Record(id=f"probe-{seed}-{i}", task="vsp", question=question, images=[ImageRef(data=image)],
                          steps=[Step.of_text(text)], answer=text, meta={"map_desc": map_desc}))
    return out


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("row", "locate", "count"), default="row")
    p.add_argument("--freeze-vision", action="store_true", help="keep the vision tower at its random init")
    p.add_argument("--system-prompt", default="", help=f'default "" (none); Qwen\'s is "{DEFAULT_SYSTEM_PROMPT}"')
    p.add_argument("--text-before-image", type=int, default=0, help="words of filler text before the map")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-maps", type=int, default=4000)
    p.add_argument("--size", type=int, default=3, help="map side")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    train_records = records(a.task, a.train_maps, 0, a.size, a.text_before_image)
    test_records = records(a.task, 256, 1, a.size, a.text_before_image)
    with tempfile.TemporaryDirectory() as tmp:  # the processor: BPE on the probe's own text, patch 32
        texts = [r.question + r.answer for r in train_records[:500]]
        path = build_tiny_processor(tmp, texts, patch_size=32, min_pixels=(64 * 3) ** 2, max_pixels=(64 * 8) ** 2,
                                    system_prompt=a.system_prompt)
        processor, latent_ids = load_processor(path)
    tok = processor.tokenizer
    train = [encode_record(r, processor, latent_ids, 4, 2048) for r in train_records]
    test = [encode_record(r, processor, latent_ids, 4, 2048) for r in test_records]
    image_at = int(train[0].mm_token_type_ids.nonzero()[0])
    size = TinySize(hidden=a.hidden, layers=a.layers, intermediate=2 * a.hidden, heads=4, kv_heads=2, vision_depth=2,
                    vision_hidden=64, vision_intermediate=128, vision_heads=2, rope_theta=a.rope_theta)
    model = build_tiny_model(tok, processor.image_processor, size, seed=a.seed)
    if a.freeze_vision:
        freeze_vision(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    digits = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    print(f"task {a.task}: the map's first image token is token {image_at}; {len(train)} training maps", flush=True)

    def logits(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=batch["mm_token_type_ids"]).logits[:, :-1]

    @torch.no_grad()
    def digit_accuracy() -> tuple[float, float]:
        model.eval()
        right = total = 0
        ce = 0.0
        for i in range(0, len(test), 32):
            batch = collate_padded(test[i:i + 32], tok.pad_token_id)
            out, labels = logits(batch), batch["labels"][:, 1:]
            mask = torch.isin(labels, digits)
            right += int((out.argmax(-1)[mask] == labels[mask]).sum())
            total += int(mask.sum())
            ce += float(torch.nn.functional.cross_entropy(out[mask], labels[mask], reduction="sum"))
        model.train()
        return right / total, ce / total

    rng, start = random.Random(a.seed), time.time()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 30) * (0.55 + 0.45 * math.cos(math.pi * step / a.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = collate_padded(rng.sample(train, a.batch_size), tok.pad_token_id)
        out = logits(batch)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, a.steps // 10) == 0:
            acc, ce = digit_accuracy()
            print(f"step {step}: loss {loss.item():.3f}  held-out digit accuracy {acc:.3f}  digit CE {ce:.3f}  "
                  f"({time.time() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
