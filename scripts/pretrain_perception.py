"""Build a perception-pretrained tiny base model: the method table's Qwen2.5-VL with a vision tower that knows where things are.

    python scripts/pretrain_perception.py --out runs/perception-base [--steps 650 --batch-size 32 --seed 0]  # ~3.5 CPU minutes

Then train from it with the existing trainer: `model.name_or_path=runs/perception-base` and
`data.processor=runs/perception-base` (keep `model.freeze_vision: true`: the tower is done).

Why: the random frozen tower gives each square type one feature wherever the square is, so ILVR's
helper-image targets carry no state (docs/method.md). This trains the tower + merger of the method
table's tiny model (LM hidden 128, 4 layers, 4 heads; vision hidden 64, depth 2; processor patch 32
so one merged token = one 64 px square) on drawn VSP states (3x3-5x5 maps, the elf anywhere, any
facing) with linear heads per merged token: type, the elf's facing, row, column, 4 neighbours'
types (ilvr/model/perception.py). The heads are dropped; the LM keeps its random init (the same
weights `build_tiny_model(seed)` gives). The directory holds config.json + model.safetensors +
the processor files + perception_pretraining.json (settings, probes before/after, the sha256 of
the weights: same seed and thread count -> same hash).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.sources import synthetic_vsp  # noqa: E402
from data_pipeline.tiny_processor import build_tiny_processor, load_processor  # noqa: E402
from data_pipeline.vsp_squares import random_state  # noqa: E402
from ilvr.evaluation.tower_probe import same_type_cosine, square_probes  # noqa: E402
from ilvr.model.build import build_tiny_model  # noqa: E402
from ilvr.model.patch_embed import use_patch_matmul  # noqa: E402
from ilvr.model.perception_base import METHOD_TABLE_SIZE, REPORT, save_asset  # noqa: E402
from ilvr.model.perception import (  # noqa: E402
    PerceptionHeads, collate_states, encode_states, tower_features, train_tower, weights_sha256,
)

PATCH = 32  # x merge 2 = 64 px: one merged token per square of the benchmark's images


def tokenizer_texts(n: int) -> list[str]:
    """Questions and trace texts of every synthetic style (3x3-8x8), so the base's tokenizer fits any variant."""
    texts = []
    for style in ("latent-coords", "latent-moves", "direct", "perceive", "locate"):
        for question in synthetic_vsp.QUESTIONS:
            for r in synthetic_vsp.read(num_samples=n, min_size=3, max_size=8, style=style, question=question):
                texts.append(r.question.replace("<image>", " "))
                texts.extend(s.text for s in r.steps if s.text)
    return texts


def states(tag: str, n: int, seed: int, min_size: int, max_size: int) -> list:
    return [random_state(random.Random(f"perception-pretrain/{seed}/{tag}/{i}"), min_size, max_size)
            for i in range(n)]


@torch.no_grad()
def probe_tower(model, pool, chunk: int = 64) -> dict:
    """Held-out probes and same-type cosine of the tower's merged-token features on `pool`."""
    feats, owner = [], []
    for i in range(0, len(pool), chunk):
        batch = collate_states(pool[i:i + chunk])
        feats.append(tower_features(model, batch).float())
        owner += [i + j for j, s in enumerate(pool[i:i + chunk]) for _ in range(s.labels["type"].numel())]
    features, owner = torch.cat(feats), torch.tensor(owner)
    labels = collate_states(pool).labels
    return {"probe_accuracy": square_probes(features, labels, owner),
            "same_type_cosine": same_type_cosine(features, labels["type"], labels["row"], labels["col"])}


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the base model directory to write")
    p.add_argument("--processor", default="", help="copy this tiny processor (patch 32) instead of building one")
    p.add_argument("--steps", type=int, default=650)  # rows are read by ~250, columns by ~650 (docs/method.md)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-states", type=int, default=200)
    p.add_argument("--min-size", type=int, default=3)
    p.add_argument("--max-size", type=int, default=5)
    p.add_argument("--tokenizer-records", type=int, default=100, help="records per style and question for the BPE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--asset", default="", help="also write the small asset (processor + vision weights) here, e.g. "
                   "assets/perception-base: python -m ilvr.model.perception_base rebuilds the base from it")
    p.add_argument("--log-every", type=int, default=25)
    a = p.parse_args(argv)
    started = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.processor:
        shutil.copytree(a.processor, out, dirs_exist_ok=True)
    else:
        build_tiny_processor(str(out), tokenizer_texts(a.tokenizer_records), patch_size=PATCH,
                             min_pixels=(2 * PATCH * 3) ** 2, max_pixels=(2 * PATCH * 8) ** 2, system_prompt="")
    processor, _ = load_processor(str(out))
    size = METHOD_TABLE_SIZE
    model = build_tiny_model(processor.tokenizer, processor.image_processor, size, seed=a.seed)
    use_patch_matmul(model)  # same parameters and names, faster
    test = encode_states(states("test", a.test_states, a.seed, a.min_size, a.max_size), processor.image_processor)

    def draw_batch(step: int):  # fresh states every step (held-out ones come from another stream)
        drawn = states(f"train/{step}", a.batch_size, a.seed, a.min_size, a.max_size)
        return collate_states(encode_states(drawn, processor.image_processor))

    before = probe_tower(model, test)
    print("random tower:", json.dumps(before), flush=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(a.seed)
        heads = PerceptionHeads(size.hidden, a.max_size)
    losses = train_tower(model, heads, draw_batch, a.steps, a.lr, a.log_every, log=lambda line: print(line, flush=True))
    after = probe_tower(model, test)
    print("pretrained tower:", json.dumps(after), flush=True)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    model.save_pretrained(str(out))
    digest = weights_sha256(model)
    report = {"settings": vars(a), "model": vars(size), "weights_sha256": digest, "final_loss": losses[-1] if losses
              else None, "held_out": {"random_tower": before, "pretrained_tower": after},
              "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1)}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if a.asset:
        save_asset(model, str(out), report, a.asset)
        print(f"asset (processor + vision weights) written to {a.asset}", flush=True)
    print(f"saved {out} (weights sha256 {digest}) in {time.time() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
