"""The project's perception-pretrained tiny base, kept small: its processor and vision weights only.

scripts/pretrain_perception.py trains the method table's tiny Qwen2.5-VL tower + merger to say where
each square is (~3.5 CPU minutes). Its LM is left at the random init that `build_tiny_model(seed)`
gives, so the vision weights (2.3 MB) and the processor files are all it takes to rebuild the whole
base (5.3 MB) in seconds: `materialize_base` builds the LM from the seed, loads the tower, checks the
sha256 of the full weights against the one pretraining recorded, and saves a Hugging Face directory
for `model.name_or_path` / `data.processor`. The asset is committed (assets/perception-base), so the
quick start and CI start from the same base without training it.

    python -m ilvr.model.perception_base --out runs/perception-base [--asset assets/perception-base]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ilvr.model.build import TinySize, build_tiny_model

REPORT = "perception_pretraining.json"  # pretraining's settings, probes and the full weights' sha256
VISION_WEIGHTS = "visual.safetensors"
ASSET = Path(__file__).resolve().parents[2] / "assets" / "perception-base"
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")
# the method table's tiny model (scripts/method_table.py Settings.tiny_*): LM 128 x 4 layers, vision 64 x 2
METHOD_TABLE_SIZE = TinySize(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vision_depth=2,
                             vision_hidden=64, vision_intermediate=128, vision_heads=2, rope_theta=10.0)


class BaseMismatch(RuntimeError):
    """The rebuilt base's weights differ from the pretrained one's (another torch: another random LM init)."""


def vision_state(model) -> dict[str, torch.Tensor]:
    """The tower + merger weights (every state-dict entry under `visual.`)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith("visual.") or ".visual." in k}


def save_asset(model, processor_dir: str, report: dict, out: str) -> None:
    """Write the small asset: processor files, the vision weights and the pretraining report."""
    from safetensors.torch import save_file

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        shutil.copyfile(Path(processor_dir) / name, dest / name)
    save_file(vision_state(model), str(dest / VISION_WEIGHTS))
    (dest / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def materialize_base(out: str, asset: "str | Path" = ASSET) -> dict:
    """Rebuild the full base from `asset` into `out` (a Hugging Face model + processor directory).

    Raises BaseMismatch when the rebuilt weights' sha256 differs from the recorded one. Returns the report.
    """
    from safetensors.torch import load_file

    from data_pipeline.tiny_processor import load_processor
    from ilvr.model.perception import weights_sha256

    asset = Path(asset)
    missing = [n for n in (*PROCESSOR_FILES, VISION_WEIGHTS, REPORT) if not (asset / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{asset} lacks {', '.join(missing)}: make the asset with "
                                "python scripts/pretrain_perception.py --out DIR --asset ASSET_DIR")
    report = json.loads((asset / REPORT).read_text(encoding="utf-8"))
    if TinySize(**report["model"]) != METHOD_TABLE_SIZE:
        raise BaseMismatch(f"{asset / REPORT} records model {report['model']}, not the method table's size")
    processor, _ = load_processor(str(asset))
    model = build_tiny_model(processor.tokenizer, processor.image_processor, METHOD_TABLE_SIZE,
                             seed=report["settings"]["seed"])
    vision = load_file(str(asset / VISION_WEIGHTS))
    own = vision_state(model)
    if set(vision) != set(own):
        raise BaseMismatch(f"{asset / VISION_WEIGHTS}: its tensors are not this model's tower + merger "
                           f"({len(set(vision) ^ set(own))} names differ)")
    model.load_state_dict(vision, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    digest = weights_sha256(model)
    if digest != report["weights_sha256"]:
        raise BaseMismatch(f"the rebuilt base's weights hash {digest[:12]}... differs from the pretrained "
                           f"{report['weights_sha256'][:12]}... (torch {torch.__version__}: the LM's random init "
                           "differs?); pretrain one here: python scripts/pretrain_perception.py --out DIR")
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    for name in (*PROCESSOR_FILES, REPORT):
        shutil.copyfile(asset / name, dest / name)
    return report


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the base model directory to write")
    p.add_argument("--asset", default=str(ASSET))
    a = p.parse_args(argv)
    if (Path(a.out) / "config.json").is_file():
        print(f"{a.out} already holds a model: not rebuilt")
        return 0
    try:
        report = materialize_base(a.out, a.asset)
    except (FileNotFoundError, BaseMismatch) as e:
        print(f"error: {e}")
        return 2
    print(f"perception base rebuilt in {a.out} (weights sha256 {report['weights_sha256'][:12]}..., held-out probes "
          f"row {report['held_out']['pretrained_tower']['probe_accuracy']['row']:.3f}, column "
          f"{report['held_out']['pretrained_tower']['probe_accuracy']['col']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
