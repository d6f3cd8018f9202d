"""ilvr_settings.json: what ILVR inference needs beside an exported model's weights (K, the latent tokens, the
stage and step, the loss settings, the latent scale with its norm, the mean fed-back state).

ilvr-export writes it (ilvr/export.py); evaluation reads it (ilvr/evaluation/loading.py), and a run that
starts from an exported model reads its latent norm (ilvr/training/latent_stats.py). A checkpoint has no such
file: `checkpoint_settings` makes the same fields from its trainer.json.
"""
from __future__ import annotations

from data_pipeline.latent_tokens import LATENT_TOKENS, LatentTokenIds

SETTINGS_FILE = "ilvr_settings.json"


def latent_settings(tokenizer, latent_size: int) -> dict:
    """The latent-token part of ilvr_settings.json, looked up in `tokenizer`."""
    ids = LatentTokenIds.from_tokenizer(tokenizer)
    return {
        "latent_size": int(latent_size),
        "latent_tokens": {name: {"token": tok, "id": tid}
                          for name, tok, tid in zip(("start", "pad", "end"), LATENT_TOKENS, ids.as_tuple())},
    }


def checkpoint_settings(trainer_state: dict) -> dict:
    """ilvr_settings.json fields from trainer.json: K, stage, step, the loss settings, the latent scale
    option with its norm, and the mean fed-back state (the constant-latent ablation's constant)."""
    config = trainer_state.get("config") or {}
    train = config.get("train", {})
    stage = trainer_state.get("stage") or train.get("stage")
    if stage == "1+2":  # which of the two the checkpoint is in
        stage = "1" if trainer_state.get("step", 0) < train.get("stage1_steps", 0) else "2"
    if "latent_size" not in config.get("model", {}):
        raise ValueError("trainer.json has no config.model.latent_size")
    return {"latent_size": config["model"]["latent_size"], "stage": stage, "step": trainer_state.get("step"),
            "loss": config.get("loss", {}),
            # the scale option and the ablation's constant (generate.py): recorded in training
            "latent_rescale": bool(config["model"].get("latent_rescale", False)),
            "latent_norm": trainer_state.get("latent_norm"), "fed_mean": trainer_state.get("fed_mean")}
