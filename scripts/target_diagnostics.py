"""Can the stage-1 targets carry the state? The step-0 teacher's selection on synthetic VSP maps.

    python scripts/target_diagnostics.py --model tiny|BASE_DIR|EXPORT --processor DIR [--maps 300 --size 3] [--swap]
        [--set temperature=0.3 query_parts=user,context change_weight=1]

At step 0 the momentum teacher is the initial model, so no training is needed to see what stage 1
will align the latents to. On `--maps` held-out synthetic maps (latent-moves traces, short
question, seed 1) it reports, with the method table's loss settings (LossConfig defaults, K = 4):
  changed: the share of segments whose picks include a square that changed since the previous
           image (changed_squares.py), and that share for random picks (chance);
  probe:   a held-out linear probe of the player's square from each segment's targets (mean of
           the picks; target_probe.py), with the step-only control and the majority rate;
  swap:    (--swap) the CE rise of the text after a segment when its targets are another map's
           (latent_swap.py); at step 0 the LM is random, so this is for trained models.
`--set` changes LossConfig fields (the selection's settings); `--model` may also be a trained model's
export (ilvr-export), whose selection is the one its momentum teacher would make (a trained student).
`--model tiny` builds the method table's random-init model (seed 0): the same LM as a base from
scripts/pretrain_perception.py built with the same processor and seed, with the random tower.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.collate import collate_padded  # noqa: E402
from data_pipeline.encode import encode_record  # noqa: E402
from data_pipeline.sources import synthetic_vsp  # noqa: E402
from data_pipeline.tiny_processor import load_processor  # noqa: E402
from ilvr.config import Config, ConfigError, LossConfig, validate  # noqa: E402
from ilvr.evaluation.latent_probe import probe  # noqa: E402
from ilvr.evaluation.latent_swap import inputs_from_selection, swap_test  # noqa: E402
from ilvr.evaluation.target_probe import segment_players, target_examples, target_features  # noqa: E402
from ilvr.model.build import build_tiny_model, init_latent_embeddings, load_pretrained  # noqa: E402
from ilvr.model.changed_squares import changed_stats  # noqa: E402
from ilvr.model.patch_embed import use_patch_matmul  # noqa: E402
from ilvr.model.perception_base import METHOD_TABLE_SIZE  # noqa: E402
from ilvr.model.selection import select_targets  # noqa: E402



def load_model(name: str, processor, latent_ids):
    model = (build_tiny_model(processor.tokenizer, processor.image_processor, METHOD_TABLE_SIZE, seed=0)
             if name == "tiny" else load_pretrained(name, torch.float32, "sdpa"))
    init_latent_embeddings(model, processor.tokenizer, latent_ids)  # as the trainer's build_model does
    use_patch_matmul(model)
    return model.eval()


@torch.no_grad()
def diagnose(model, processor, latent_ids, records, latent_size: int, batch_size: int, swap: bool,
             cfg: "LossConfig | None" = None) -> dict:
    cfg = cfg or LossConfig()
    merge = model.config.vision_config.spatial_merge_size
    hits = chance = segments = 0.0
    feats, players, deltas = [], [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = collate_padded([encode_record(r, processor, latent_ids, latent_size, 4096) for r in chunk],
                               processor.tokenizer.pad_token_id)
        sel = select_targets(model, batch, cfg, latent_size)
        stats = changed_stats(batch, sel, merge)
        hits += stats["changed_share"] * stats["changed_segments"]
        chance += stats["changed_chance"] * stats["changed_segments"]
        segments += stats["changed_segments"]
        feats.append(target_features(sel))
        players += [segment_players(r) for r in chunk]
        if swap:
            result = swap_test(model, batch, *inputs_from_selection(sel))
            if result["segments"]:
                deltas.append((result["delta"], result["segments"]))
    out = {"maps": len(records), "segments": int(segments),
           "changed_share": hits / max(segments, 1), "changed_chance": chance / max(segments, 1),
           "player_probe": probe(target_examples(torch.cat(feats), players))}
    if swap:
        n = sum(w for _, w in deltas)
        out["swap_ce_rise"] = sum(d * w for d, w in deltas) / n if n else float("nan")
    return out


def loss_config(pairs: list[str], parser) -> LossConfig:
    """LossConfig with `key=value` changes, typed as the field's default (validated as the trainer does)."""
    cfg = LossConfig()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(cfg, key):
            parser.error(f"--set {pair!r}: give KEY=VALUE with KEY one of {', '.join(dataclasses.asdict(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    try:
        validate(Config(loss=cfg), check_paths=False)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help='"tiny" (random init, method-table size) or a model directory')
    p.add_argument("--processor", required=True, help="a patch-32 processor dir (a pretrain_perception base holds one)")
    p.add_argument("--maps", type=int, default=300)
    p.add_argument("--size", type=int, default=3, help="maps of this size (or --min-size/--max-size)")
    p.add_argument("--min-size", type=int, default=0)
    p.add_argument("--max-size", type=int, default=0)
    p.add_argument("--latent-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--swap", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="LossConfig fields, e.g. temperature=0.3")
    p.add_argument("--out", default="", help="write the result JSON here too")
    a = p.parse_args(argv)
    cfg = loss_config(a.set, p)
    processor, latent_ids = load_processor(a.processor)
    records = list(synthetic_vsp.read(num_samples=a.maps, min_size=a.min_size or a.size, max_size=a.max_size or a.size, seed=1,
                                      style="latent-moves", question="short"))
    model = load_model(a.model, processor, latent_ids)
    result = {"model": a.model, "loss": dataclasses.asdict(cfg), "latent_size": a.latent_size,
              **diagnose(model, processor, latent_ids, records, a.latent_size, a.batch_size, a.swap, cfg)}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
