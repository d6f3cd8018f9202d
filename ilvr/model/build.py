"""Build the student (or teacher) model: a local Qwen2.5-VL / Qwen2-VL checkpoint, or a tiny random one.

Stock transformers classes only. The latent tokens are added to the tokenizer by
`load_processor`; here their embedding rows start at the mean embedding (so latent
markers begin as an "average" token), the vision tower, merger and LM are frozen as asked,
the patch embedding's Conv3d runs as a matmul on the same parameters (patch_embed.py), and
the attention implementation is chosen: FlashAttention-2 when flash-attn imports and CUDA
is present, else PyTorch SDPA.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass

import torch

from data_pipeline.latent_tokens import LatentTokenIds
from ilvr.config import ModelConfig
from ilvr.model.patch_embed import use_patch_matmul

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a random-init Qwen2.5-VL for tests, the CPU quick start and CPU benchmarks."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 1
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    rope_theta: float = 1e4

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "TinySize":
        """The size `model.tiny_*` asks for (MLPs at 2x width, KV heads at half the heads, 2 vision heads)."""
        return cls(hidden=cfg.tiny_hidden, intermediate=2 * cfg.tiny_hidden, layers=cfg.tiny_layers,
                   heads=cfg.tiny_heads, kv_heads=cfg.tiny_heads // 2, vision_depth=cfg.tiny_vision_depth,
                   vision_hidden=cfg.tiny_vision_hidden, vision_intermediate=2 * cfg.tiny_vision_hidden,
                   vision_heads=2, rope_theta=cfg.tiny_rope_theta)

    def __post_init__(self):
        head_dim = self.hidden // self.heads
        if head_dim % 2 or head_dim < 8:
            raise ValueError(f"hidden/heads = {head_dim} must be an even head_dim >= 8 (mrope splits it in 3)")


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) split of head_dim/2 rotary pairs, scaled from [16, 24, 24] of 128."""
    half = head_dim // 2
    t = max(1, round(half * 16 / 64))
    h = (half - t) // 2
    return [t, h, half - t - h]


def choose_attention(requested: str) -> str:
    """The attention implementation to use: `requested`, or for "auto" flash-attn when usable, else SDPA."""
    flash_ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        chosen = "flash_attention_2" if flash_ok else "sdpa"
    elif requested == "flash_attention_2" and not flash_ok:
        raise ValueError("model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
                         "(pip install 'ilvr-train[flash]'); use 'sdpa' or 'auto' here")
    else:
        chosen = requested
    log.info("attention implementation: %s (requested %s)", chosen, requested)
    return chosen


def dtype_name(name: str, cuda: "bool | None" = None) -> str:
    """model.dtype -> "bf16" | "fp16" | "fp32"; "auto" is bf16 on CUDA, fp32 on CPU."""
    if name != "auto":
        return name
    return "bf16" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"


def resolve_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(name)]


def tiny_config(tokenizer, image_processor, size: TinySize = TinySize(), attn_implementation: str = "sdpa"):
    """A Qwen2.5-VL config whose vocabulary, special ids and patching match `tokenizer` / `image_processor`."""
    from transformers import Qwen2_5_VLConfig

    def tid(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    head_dim = size.hidden // size.heads
    merge = image_processor.merge_size
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
            num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=len(tokenizer),
            max_position_embeddings=32768, bos_token_id=None, eos_token_id=tid("<|im_end|>"),
            pad_token_id=None,  # no padding row: its init indexes the weight, which fails under zero.Init
            rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta,
                             "mrope_section": mrope_section(head_dim)},
        ),
        vision_config=dict(
            depth=size.vision_depth, hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads, patch_size=image_processor.patch_size, spatial_merge_size=merge,
            temporal_patch_size=image_processor.temporal_patch_size, out_hidden_size=size.hidden,
            fullatt_block_indexes=list(range(size.vision_depth)), window_size=image_processor.patch_size * merge * 4,
        ),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False, attn_implementation=attn_implementation,
    )


def build_tiny_model(tokenizer, image_processor, size: TinySize = TinySize(), seed: int = 0,
                     dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A random-init tiny Qwen2.5-VL (same classes as the real model), deterministic for `seed`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_config(tokenizer, image_processor, size, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(dtype)


def load_pretrained(path: str, dtype: torch.dtype, attn_implementation: str):
    """A local Qwen2.5-VL / Qwen2-VL checkpoint through the public Auto API (no download: local files only)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"model.name_or_path={path!r} is a {config.model_type!r} model; ILVR-train supports "
                         "qwen2_5_vl and qwen2_vl")
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                       local_files_only=True)


def init_latent_embeddings(model, tokenizer, latent_ids: LatentTokenIds) -> bool:
    """Give the latent tokens' embedding rows (input and output) the mean of the original tokens' rows.

    Real Qwen checkpoints pad their vocabulary, so the new ids usually have rows already,
    but untrained ones. Done once: the ids are recorded in the model config
    (`ilvr_latent_token_ids`), so a trained ILVR checkpoint is never re-initialised.
    Works on ZeRO-3 partitioned weights (gathered, modified on rank 0, re-partitioned).
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0] and not _partitioned(model):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = list(latent_ids.as_tuple())
    if getattr(model.config, "ilvr_latent_token_ids", None) == ids:
        return False
    n_original = min(ids)
    for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
        with _gathered(emb.weight), torch.no_grad():
            if emb.weight.shape[0] > max(ids):  # a partitioned weight shows shape (0,) off rank 0
                emb.weight[ids] = emb.weight[:n_original].mean(0, keepdim=True).to(emb.weight.dtype)
    model.config.ilvr_latent_token_ids = ids
    return True


def _partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _gathered(param):
    """A context that makes a ZeRO-3 parameter whole for modification on rank 0 (a no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    import contextlib

    return contextlib.nullcontext()


def freeze_vision(model) -> int:
    """Freeze the vision tower and its merger (projector); return how many parameters were frozen."""
    from ilvr.model.parts import freeze_parts

    return freeze_parts(model, {"vit", "aligner"})


# the transformers modules whose classes build_model instantiates
MODEL_MODULES = ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "transformers.models.qwen2_vl.modeling_qwen2_vl")


def import_model_classes() -> None:
    """Import the model classes now, so that no `deepspeed.zero.Init` is open when they are defined.

    zero.Init wraps the `__init__` of every nn.Module class it sees and puts the recorded one back on
    exit; a class *defined* while it is open is recorded from `__init_subclass__`, i.e. before any class
    decorator runs. transformers >= 5.25 decorates `Qwen2_5_VLAttention` with kernels'
    `use_kernelized_func`, whose `__init__` stores `_kernel_funcs` on each instance: defined inside
    zero.Init, the class gets its undecorated `__init__` back on exit, and the next model built (the
    momentum teacher) fails at its first forward with "no attribute '_kernel_funcs'". Defined before,
    zero.Init records and restores the decorated `__init__`.
    """
    for name in MODEL_MODULES:
        importlib.import_module(name)


def zero3_init(ds_config: "dict | None"):
    """`deepspeed.zero.Init(ds_config)` with the model classes imported first (import_model_classes);
    a no-op context for None. Every model the project partitions at construction is built in one."""
    if ds_config is None:
        return contextlib.nullcontext()
    import deepspeed

    import_model_classes()
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def build_model(cfg: ModelConfig, tokenizer, image_processor, tiny_size: "TinySize | None" = None, seed: int = 0,
                zero3_config: "dict | None" = None):
    """The model described by `cfg`, with latent-token embeddings initialised and vision frozen if configured.
    `tiny_size` overrides `model.tiny_*` (benchmarks). `zero3_config`: a ZeRO-3 DeepSpeed config to build
    the tiny model partitioned (zero3_init); a checkpoint partitions itself while loading (HfDeepSpeedConfig)."""
    with zero3_init(zero3_config if cfg.name_or_path == "tiny" else None):
        return _build_model(cfg, tokenizer, image_processor, tiny_size, seed)


def _build_model(cfg: ModelConfig, tokenizer, image_processor, tiny_size: "TinySize | None", seed: int):
    attn = choose_attention(cfg.attn_implementation)
    dtype = resolve_dtype(cfg.dtype)
    if cfg.name_or_path == "tiny":
        model = build_tiny_model(tokenizer, image_processor, tiny_size or TinySize.from_config(cfg), seed, dtype, attn)
    elif cfg.name_or_path:
        model = load_pretrained(cfg.name_or_path, dtype, attn)
    else:
        raise ValueError("model.name_or_path is empty; give a local checkpoint directory or 'tiny'")
    if init_latent_embeddings(model, tokenizer, LatentTokenIds.from_tokenizer(tokenizer)):
        log.info("latent token embeddings initialised at the mean embedding")
    from ilvr.model.parts import freeze_parts, frozen_parts

    freeze_parts(model, frozen_parts(cfg))
    use_patch_matmul(model)  # same parameters, ~5x faster than Conv3d (ilvr/model/patch_embed.py)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
