"""Typed run configuration: YAML files + dotted CLI overrides, validated before any worker starts.

    cfg = load_config(["configs/tiny_cpu.yaml"], ["train.lr=2e-5", "data.batch_size=4"])

Every mistake (unknown key, wrong type, bad value, missing path) raises ConfigError
with one message that names the field and says how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ilvr.config_checks import ConfigError, validate
from ilvr.config_yaml import load_bounded, read_bounded, short_repr


@dataclass
class DataConfig:
    """Where training data comes from and how it is streamed."""

    train_shards: str = ""  # brace pattern ("d/train-{000000..000009}.tar"), a comma list, or a shard dir
    eval_shards: str = ""  # held-out shards of this recipe: what `ilvr-eval run --config` reads when eval.shards is empty
    processor: str = ""  # local HF processor directory (real Qwen2.5-VL or the tiny one)
    batch_size: int = 1  # samples per rank per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 256  # samples per worker held for shuffling; 0 = no shuffle
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs, or shards drawn with replacement
    samples_per_epoch: int = 0  # resampled mode: samples per rank per nominal epoch (0 = dataset size / world)
    max_length: int = 4096  # longer samples are skipped and counted ("too_long")
    packing: bool = False  # several samples per row with cu_seqlens (varlen attention path)
    max_skip_fraction: float = 0.05  # stop the run when more than this fraction of samples is bad
    # resize bounds of the processor (LLaMA-Factory's image_min_pixels / image_max_pixels): every image is
    # resized to an area in [min_pixels, max_pixels], which sets its vision-token count; 0 = the processor's own
    min_pixels: int = 0
    max_pixels: int = 0
    # bounded memory on hostile data (docs/reliability.md): checked before anything is decoded or read
    # a SKIP limit, not a resize bound (that is max_pixels): from the image header, larger images are skipped
    max_image_pixels: int = 40_000_000  # ("too_large")
    max_member_bytes: int = 64 << 20  # a shard member larger than this is skipped unread ("too_large")
    max_sample_bytes: int = 256 << 20  # a sample whose members total more is skipped ("too_large")
    seed: int = 0


@dataclass
class LoraConfig:
    """LoRA on the language model (PEFT), docs/training.md "LoRA"; r = 0 trains the model in full."""

    r: int = 0  # adapter rank; 0 = off (full fine-tuning of what model.freeze_* leaves trainable)
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.0  # on the adapter's input
    # "all-linear": every linear layer of the LM (attention and MLP projections, not lm_head), never the
    # vision tower's; or a comma list of layer names inside the LM, e.g. "q_proj,v_proj"
    target_modules: str = "all-linear"


@dataclass
class ModelConfig:
    """Which model to train and how it is built."""

    name_or_path: str = ""  # local Qwen2.5-VL / Qwen2-VL directory; "tiny" builds a random tiny model
    latent_size: int = 8  # K: latent pads per latent segment
    # what trains, per part (ms-swift's freeze_vit / freeze_aligner / freeze_llm); the reference freezes the
    # vision tower and its merger. The older `model.freeze_vision: X` still loads: it sets both vision keys
    freeze_vit: bool = True  # the vision tower (patch embedding + blocks)
    freeze_aligner: bool = True  # the merger: the projector from vision features into the LM
    freeze_llm: bool = False  # the language model (embeddings, decoder, lm_head)
    # LoRA adapters on the LM, the latent tokens' embedding (and output) rows trained in full (model.lora.r=8)
    lora: LoraConfig = field(default_factory=LoraConfig)
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # per layer in stage 1, per decoder call in stage 2 (docs/training.md)
    # fed-back latent states rescaled to the stage-1 targets' mean norm, in stage 1's alignment
    # inputs at inference, in stage 2 and in generation alike (docs/model.md, "Scale")
    latent_rescale: bool = False
    # name_or_path "tiny" only: the random-init model's size (MLP 2x hidden, KV heads = heads / 2)
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_vision_hidden: int = 32
    tiny_vision_depth: int = 1
    # rotary base of the tiny LM. mrope gives an image's columns the lowest frequencies of the head: at
    # head size 32 and base 1e4 one column turns them by <= 0.003 rad, so attention cannot tell columns
    # apart; a from-scratch model that must read a map needs a small base (e.g. 10: >= 0.1 rad per column)
    tiny_rope_theta: float = 10000.0


@dataclass
class LossConfig:
    """Stage-1 selective perceptual supervision and the loss weights."""

    # where stage-1 targets come from: the momentum teacher's selection (the method), or "pooled":
    # the helper image's own features from the student, pooled to K (the Mirage-style ablation; no
    # teacher is built, so also the cheap choice for data without latent steps)
    targets: Literal["teacher", "pooled"] = "teacher"
    w_ce: float = 1.0
    w_align: float = 1.0
    coverage_p: float = 0.9  # keep candidates until this probability mass, capped at K
    # scores = cosine(candidate, query), standardised per segment ("none": raw cosine, the reference)
    score_norm: Literal["standardize", "none"] = "standardize"
    temperature: float = 0.1  # softmax temperature over the scores (in std units when standardised)
    max_candidates: int = 256  # L: helper-image features pooled down to at most this many
    target_order: Literal["probability", "raster"] = "probability"  # order of the K* picks in a segment
    target_noise: float = 0.01  # noise on injected targets, relative: ||noise|| ~ target_noise * ||target||
    # which parts make the teacher's context query (ILVR_METHOD.md, stage 1 step 3): "user" (prompt + input
    # image), "context" (the assistant text before the segment), "previous" (the previous segment's picks).
    # All three is the method; fewer is a diagnostic (docs/method.md: what drives the selection)
    query_parts: str = "user,context,previous"
    # NOT the method (off by default): add change_weight x the standardised change of each candidate since the
    # previous image (1 - cosine to the same position in the previous helper image, or in the input image for
    # the first segment) to the standardised context scores, so the squares that changed are picked first.
    # The method's query favours what looks like what came before (docs/method.md, measured); 0 = faithful
    change_weight: float = 0.0


@dataclass
class TrainConfig:
    """The optimisation loop, schedule, teacher and checkpoints."""

    output_dir: str = "runs/default"
    stage: Literal["1", "2", "1+2"] = "1+2"
    stage1_steps: int = 0  # with stage "1+2": optimizer steps of stage 1 before stage 2
    max_steps: int = 100  # optimizer steps; 0 = from train.epochs (a recipe that gives epochs and no max_steps)
    # the run's length in passes over data.train_shards, resolved to max_steps at start-up from the manifest's
    # sample counts, world size, data.batch_size and train.grad_accum (exclusive with max_steps)
    epochs: float = 0.0
    stage1_epochs: float = 0.0  # with stage "1+2" and epochs: stage 1's share, resolved to stage1_steps
    lr: float = 1e-5
    # learning-rate multipliers of the vision tower and the merger (ms-swift's vit_lr / aligner_lr, as factors
    # of train.lr); the LM trains at train.lr. Only for parts that train (model.freeze_vit / freeze_aligner)
    vit_lr_mult: float = 1.0
    aligner_lr_mult: float = 1.0
    weight_decay: float = 0.01  # not on biases and norm weights (the 1-D parameters), as the HF Trainer does
    decay_biases_and_norms: bool = False  # true: decay every parameter, as runs from before this option did
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of train.max_steps, rounded up (the HF Trainer's); or warmup_steps
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    seed: int = 42
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end and on signals
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    # a checkpoint is marked unhealthy (never resumed, exported or pruned as the one that counts) when, at its
    # save, a threshold is passed (ilvr/training/health.py; 0 = off): the trainable weights' RMS, the last
    # step's gradient norm before clipping, the median loss of the last 3 steps above the median before them
    health_max_weight_rms: float = 100.0
    health_max_grad_norm: float = 1.0e6
    health_loss_spike: float = 5.0
    stop_after: int = 0  # leave (with a checkpoint) after this many steps in this process; 0 = run to max_steps
    collective_timeout: int = 600  # seconds a collective may wait before a dead rank stops the job
    # ZeRO-3: gather the teacher once per step and, in stage 2, the language model once per micro-batch
    # (forward + backward) instead of once per decoder call (docs/training.md, "Stage 2 under ZeRO-3")
    gather_once: bool = True
    comm_stats: bool = False  # log comm/* (collective calls and bytes per step) from DeepSpeed's comms logger
    # evaluation during training (docs/training.md): every eval_every steps the benchmark scorer runs on
    # data.eval_shards (eval.limit records, eval.mode decoding) on all ranks; eval/<metric> goes beside the losses
    eval_every: int = 0  # 0 = off
    # keep the checkpoint of the best evaluation by this scorer metric (e.g. accuracy): saved at each new best,
    # never pruned, named by <output_dir>/checkpoints/best.json (ilvr-export --best); "" = off
    keep_best: str = ""
    keep_best_mode: Literal["auto", "max", "min"] = "auto"  # auto: the metric's own direction (accuracy: max)


@dataclass
class EvalConfig:
    """Evaluation defaults (benchmarks, decoding)."""

    shards: str = ""
    benchmark: Literal["vsp", "comt", "zebra", "auto"] = "auto"
    mode: Literal["latent", "text", "constant-latent", "shuffled-latent"] = "latent"
    max_new_tokens: int = 512
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    limit: int = 0  # the first N records only (0 = all): ilvr-eval's --limit, and train.eval_every's sample count


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for experiment-tracker params (model.lora.r: nested sections too)."""
        def walk(prefix: str, tree: dict) -> dict[str, Any]:
            return {k2: v2 for k, v in tree.items()
                    for k2, v2 in (walk(f"{prefix}{k}.", v) if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}

        return walk("", self.to_dict())

    def save(self, path: str, header: str = "") -> None:
        """Write the config as a YAML recipe (reloadable with load_config); `header`: leading comment lines."""
        data = {s: {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()} for s, sec in self.to_dict().items()}
        with open(path, "w", encoding="utf-8") as f:
            f.write(header)
            yaml.safe_dump(data, f, sort_keys=False)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting strings from the command line."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices and str(value) in {str(c) for c in choices}:
            value = next(c for c in choices if str(c) == str(value))
        if value not in choices:
            raise ConfigError(f"{name}={short_repr(value)} is not allowed; choose one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[] ").split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {short_repr(value)}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {short_repr(value)}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                pass
        accepted = (int,) if tp is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {short_repr(value)}")
        return tp(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {short_repr(value)}")
        return value
    raise ConfigError(f"{name}: unsupported type {_type_name(tp)}")


# names people type from the Hugging Face Trainer, LLaMA-Factory and ms-swift, and the key that means it here
FOREIGN_NAMES = {
    "learning_rate": "train.lr", "per_device_train_batch_size": "data.batch_size",
    "num_train_epochs": "train.epochs", "save_total_limit": "train.keep_last",
    "gradient_accumulation_steps": "train.grad_accum", "save_steps": "train.save_every",
    "logging_steps": "train.log_every", "lr_scheduler_type": "train.lr_schedule", "adam_beta1": "train.betas",
    "adam_beta2": "train.betas", "model_name_or_path": "model.name_or_path",
    "dataloader_num_workers": "data.num_workers",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "bf16": "model.dtype", "fp16": "model.dtype",
    "torch_dtype": "model.dtype", "vit_lr": "train.vit_lr_mult", "aligner_lr": "train.aligner_lr_mult",
    "freeze_vision_tower": "model.freeze_vit", "freeze_multi_modal_projector": "model.freeze_aligner",
    "freeze_language_model": "model.freeze_llm", "lora_rank": "model.lora.r", "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha", "lora_dropout": "model.lora.dropout", "lora_target": "model.lora.target_modules",
    "lora_target_modules": "model.lora.target_modules", "ema_momentum": "train.ema_decay", "batch_size": "data.batch_size",
    "image_max_pixels": "data.max_pixels", "image_min_pixels": "data.min_pixels",
}


def _dotted_keys() -> dict[str, str]:
    """field name -> section.field, over every section (a key written in the wrong section)."""
    found: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, []).append(f"{section}.{f.name}")
    return {name: where[0] for name, where in found.items() if len(where) == 1}  # seed, batch_size: ambiguous


def _unknown(name: str, known: list[str]) -> ConfigError:
    key = name.rsplit(".", 1)[-1]
    target = FOREIGN_NAMES.get(key) or _dotted_keys().get(key)
    if target and target != name:  # a name from another trainer, or a key of another section: one answer
        why = "the Hugging Face Trainer's / LLaMA-Factory's / ms-swift's name" if key in FOREIGN_NAMES \
            else f"it is a key of section {target.split('.')[0]!r}"
        return ConfigError(f"unknown config key {name!r}. Did you mean {target}? ({key}: {why}; "
                           f"docs/training.md lists every key)")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {name!r}.{hint} Known keys here: {', '.join(known)}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(name, known)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of {tp.__name__} fields, got {short_repr(value)}")
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """"train.lr=2e-5" -> {"train": {"lr": "2e-5"}} (strings are typed later, by the field)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=2e-5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0].lstrip("-") in FOREIGN_NAMES.keys() | _dotted_keys().keys():
        raise _unknown(parts[0].lstrip("-"), [])
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. data.batch_size=4")
    value: Any = raw
    if raw.strip().startswith(("[", "{")):
        value = load_bounded(raw, f"override {key.strip()}", ConfigError)
    elif raw.strip().lower() in ("null", "none", "~"):
        value = None
    for part in reversed(parts):  # model.lora.r=8 -> {"model": {"lora": {"r": "8"}}}
        value = {part: value}
    return value


def load_config(paths: "list[str] | str | None" = None, overrides: "list[str] | None" = None,
                check_paths: bool = True) -> Config:
    """Read YAML files in order (later ones win), apply dotted overrides, build and validate."""
    if isinstance(paths, str):
        paths = [paths]
    merged: dict[str, Any] = {}
    for path in paths or []:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        loaded = read_bounded(path, ConfigError) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (data:, model:, ...)")
        merged = _merge(merged, loaded)
    for text in overrides or []:
        merged = _merge(merged, parse_override(text))
    _length_from_epochs(merged)
    merged = upgrade_legacy_keys(merged)
    cfg = _build(Config, merged, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def upgrade_legacy_keys(raw: dict[str, Any], recorded: bool = False) -> dict[str, Any]:
    """Keys of older configs in today's names, so old recipes load and old runs resume.

    model.freeze_vision: X (tower and merger together) becomes freeze_vit and freeze_aligner (a new key
    given beside it wins: a recipe with freeze_vision and an override of freeze_aligner means the override).
    `recorded`: `raw` is a run's recorded config; one with freeze_vision was written before per-part
    freezing, when weight decay also covered biases and norms, so it records decay_biases_and_norms: true
    (a resume with today's default is then refused naming that field, instead of failing inside DeepSpeed
    on a different count of optimizer param groups).
    """
    model = raw.get("model")
    if not isinstance(model, dict) or "freeze_vision" not in model:
        return raw
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    value = out["model"].pop("freeze_vision")
    for key in ("freeze_vit", "freeze_aligner"):
        out["model"].setdefault(key, value)
    if recorded and isinstance(out.get("train"), dict):
        out["train"].setdefault("decay_biases_and_norms", True)
    return out


def _length_from_epochs(merged: dict[str, Any]) -> None:
    """A recipe that gives train.epochs (train.stage1_epochs) and no max_steps (stage1_steps) means the step
    counts come from the epochs: the defaults step aside (0) instead of clashing with them."""
    train = merged.get("train")
    if not isinstance(train, dict):
        return
    for epochs, steps in (("epochs", "max_steps"), ("stage1_epochs", "stage1_steps")):
        if epochs in train and steps not in train:
            train[steps] = 0
