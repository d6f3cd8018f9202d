"""The three parts of a Qwen2.5-VL that train (or not) separately: vision tower, merger, language model.

    part_of("model.visual.merger.mlp.0.weight") == "aligner"

By parameter name, so the same rule holds for the stock model, a ZeRO-3 partitioned one and a
PEFT-wrapped one (whose names gain a "base_model.model." prefix): "visual.merger." is the
aligner (ms-swift's name for the projector into the LM), the rest of "visual." the vision
tower, everything else (embeddings, decoder, lm_head) the language model.
"""
from __future__ import annotations

PARTS = ("llm", "aligner", "vit")  # the LM first: the optimizer's first param group carries train.lr (logged)


def part_of(name: str) -> str:
    """"vit", "aligner" or "llm" for a parameter name."""
    dotted = f".{name}"
    if ".visual.merger." in dotted:
        return "aligner"
    if ".visual." in dotted:
        return "vit"
    return "llm"


def frozen_parts(cfg) -> set[str]:
    """The parts `model.freeze_vit / freeze_aligner / freeze_llm` freeze (cfg: ModelConfig)."""
    return {part for part, frozen in (("vit", cfg.freeze_vit), ("aligner", cfg.freeze_aligner),
                                      ("llm", cfg.freeze_llm)) if frozen}


def freeze_parts(model, parts: "set[str] | frozenset[str]") -> int:
    """Freeze every parameter of `parts`; return how many elements were frozen (ZeRO-3 aware)."""
    frozen = 0
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)
            frozen += getattr(p, "ds_numel", p.numel())
    return frozen
