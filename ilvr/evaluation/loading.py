"""The model to evaluate, from an exported Hugging Face directory or a training checkpoint.

    exported dir (ilvr-export): config + safetensors + processor + ilvr_settings.json
    checkpoint dir:             <run>/checkpoints/step-N (DeepSpeed ZeRO shards, consolidated here)
    run dir:                    its latest complete checkpoint

Either way the result carries what ILVR decoding needs besides the weights: K, the latent
token ids (checked against the model config's record of them), and the training step.
Nothing is unpickled: a checkpoint is verified and consolidated weights-only (ilvr.export), and
an exported dir is read weights-only too (safetensors; a stray pickle there is refused).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from data_pipeline.latent_tokens import LatentTokenIds
from ilvr.export import model_from_checkpoint
from ilvr.model.build import choose_attention, load_pretrained, resolve_dtype
from ilvr.model.ilvr_settings import SETTINGS_FILE, checkpoint_settings
from ilvr.model.patch_embed import use_patch_matmul
from ilvr.training.checkpoint import latest
from ilvr.training.checkpoint_verify import is_complete, weights_only_loading

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    model: torch.nn.Module
    processor: object
    latent_ids: LatentTokenIds
    latent_size: int
    step: int | None  # training step of the weights, when known
    source: str  # the directory the weights came from
    latent_norm: "float | None" = None  # fed-back states rescaled to this norm (model.latent_rescale)
    fed_mean: "torch.Tensor | None" = None  # the mean fed-back state recorded in training (constant-latent)


def resolve_model_path(path: str) -> tuple[str, str]:
    """("exported" | "checkpoint", directory) for an exported dir, a checkpoint dir or a run dir."""
    if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        return "exported", path
    if is_complete(path):
        return "checkpoint", path
    found = latest(path) if os.path.isdir(os.path.join(path, "checkpoints")) else None
    if found:
        return "checkpoint", found
    raise FileNotFoundError(f"{path!r} is neither an exported model (no {SETTINGS_FILE}), a complete checkpoint "
                            "(a step-<N> dir with COMPLETE) nor a run dir with one: pass one of those "
                            "(ilvr-export writes the first)")


def model_step(path: str) -> int | None:
    """The training step recorded with the weights at `path` (any of the accepted layouts), or None."""
    kind, directory = resolve_model_path(path)
    name = SETTINGS_FILE if kind == "exported" else "trainer.json"
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        step = json.load(f).get("step")
    return int(step) if step is not None else None


def load_eval_model(path: str, dtype: str = "auto", attn_implementation: str = "auto",
                    device: "torch.device | str | None" = None) -> EvalModel:
    """Load weights, processor and ILVR settings from `path`; the model is in eval mode on `device`."""
    from data_pipeline.tiny_processor import load_processor

    kind, directory = resolve_model_path(path)
    torch_dtype = resolve_dtype(dtype)
    if kind == "exported":
        with open(os.path.join(directory, SETTINGS_FILE), encoding="utf-8") as f:
            settings = json.load(f)
        with weights_only_loading():  # transformers would read a pytorch_model.bin with torch.load
            model = load_pretrained(directory, torch_dtype, choose_attention(attn_implementation))
        processor, latent_ids = load_processor(directory)
    else:
        with open(os.path.join(directory, "trainer.json"), encoding="utf-8") as f:
            settings = checkpoint_settings(json.load(f))
        model = model_from_checkpoint(directory, torch_dtype)
        processor, latent_ids = load_processor(os.path.join(directory, "processor"))
    recorded = getattr(model.config, "ilvr_latent_token_ids", None)
    if recorded is not None and list(recorded) != list(latent_ids.as_tuple()):
        raise ValueError(f"{directory}: the model was trained with latent token ids {list(recorded)} but its "
                         f"processor has {list(latent_ids.as_tuple())}; re-export with the training processor")
    if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{directory}: the tokenizer has more tokens than the model has embedding rows")
    use_patch_matmul(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    step = settings.get("step")
    log.info("evaluating %s (%s, step %s, K=%d) on %s", directory, kind, step, settings["latent_size"], device)
    fed_mean = settings.get("fed_mean")
    return EvalModel(model, processor, latent_ids, int(settings["latent_size"]),
                     int(step) if step is not None else None, os.path.abspath(directory),
                     latent_norm=settings.get("latent_norm") if settings.get("latent_rescale") else None,
                     fed_mean=torch.tensor(fed_mean, dtype=torch.float32) if fed_mean else None)
