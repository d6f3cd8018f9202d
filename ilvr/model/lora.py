"""LoRA on the language model through PEFT (model.lora.*), with the latent tokens' rows trained in full.

    peft_model = apply_lora(model, cfg.model.lora, latent_ids)      # model keeps its class and its forward

PEFT injects the adapters into `model` in place, so the stock Hugging Face model (not the
PeftModel wrapper) is what DeepSpeed wraps and the loss code calls: every `model.model.visual`,
`get_input_embeddings()` of the project works unchanged. The PeftModel handle is kept for what
only it does: switching adapters (the momentum teacher's adapter), merging and saving.

Trainable under LoRA: the adapters and the latent tokens' rows of the input embedding and, when
untied, of lm_head (PEFT's trainable_token_indices: only those rows, not the whole vocabulary);
everything else is frozen. Targets: every nn.Linear of the language model ("all-linear"), or the
given layer names inside it; never the vision tower (whose MLP shares the LM's layer names) nor
lm_head.
"""
from __future__ import annotations

import torch

from ilvr.model.parts import part_of

STUDENT_ADAPTER = "default"  # PEFT's name for the first adapter
TEACHER_ADAPTER = "teacher"  # the momentum teacher's EMA adapter beside it (ilvr/training/teacher.py)


def target_module_names(model, target_modules: str) -> list[str]:
    """Full names of the LM's linear layers that get adapters (the vision tower and lm_head never do)."""
    wanted = None if target_modules.strip() == "all-linear" else {t.strip() for t in target_modules.split(",") if t.strip()}
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and part_of(f"{name}.weight") == "llm"
             and name != "lm_head" and not name.endswith(".lm_head")
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ValueError(f"model.lora.target_modules={target_modules!r} matches no linear layer of the language model "
                         "(Qwen2.5-VL's: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    return names


def peft_config(model, lora_cfg, latent_ids):
    """The peft.LoraConfig of `lora_cfg` (ilvr.config.LoraConfig) for `model`."""
    from peft import LoraConfig

    ids = list(latent_ids.as_tuple())
    tokens = {"embed_tokens": ids}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        tokens["lm_head"] = ids  # untied: the new tokens' output rows train too
    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=target_module_names(model, lora_cfg.target_modules),
                      trainable_token_indices=tokens)


def apply_lora(model, lora_cfg, latent_ids, teacher: bool = False):
    """Inject adapters (and, with `teacher`, the teacher's adapter, frozen) into `model` in place; return the
    PeftModel around it. Every rank must call it with the same RNG state (the adapters' init)."""
    from peft import get_peft_model

    config = peft_config(model, lora_cfg, latent_ids)
    peft_model = get_peft_model(model, config)
    if teacher:
        peft_model.add_adapter(TEACHER_ADAPTER, config)
        peft_model.set_adapter(STUDENT_ADAPTER)  # the student's adapter active and trainable, the teacher's frozen
    return peft_model


def register_token_params(model) -> int:
    """Under ZeRO-3: tell DeepSpeed that PEFT's trainable-token layers use parameters they do not own in their
    forward (the wrapped embedding's weight, the rows in a ParameterDict), with its public
    register_external_parameter, so they are gathered for that forward. Returns how many were registered."""
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            for param in [module.get_base_layer().weight, *module.trainable_tokens_delta.values()]:
                deepspeed.zero.register_external_parameter(module, param)
                count += 1
    return count


def merged_model(peft_model):
    """The stock Hugging Face model with the student's adapter merged in (the teacher's dropped)."""
    if TEACHER_ADAPTER in peft_model.peft_config:
        peft_model.delete_adapter(TEACHER_ADAPTER)
    return peft_model.merge_and_unload()
