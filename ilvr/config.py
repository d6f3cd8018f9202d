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

from ilvr.config_yaml import load_bounded, read_bounded, short_repr


class ConfigError(ValueError):
    """A configuration mistake; the message names the field and the fix."""


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


# ----------------------------------------------------------------------------- validation


def _validate_tiny(m: ModelConfig) -> None:
    _require(min(m.tiny_hidden, m.tiny_layers, m.tiny_heads, m.tiny_vision_hidden, m.tiny_vision_depth) >= 1,
             "model.tiny_*: sizes must be >= 1")
    _require(m.tiny_heads % 2 == 0 and m.tiny_hidden % m.tiny_heads == 0
             and (m.tiny_hidden // m.tiny_heads) % 2 == 0 and m.tiny_hidden // m.tiny_heads >= 8,
             f"model.tiny_hidden={m.tiny_hidden} / model.tiny_heads={m.tiny_heads} must give an even head size "
             ">= 8 with an even head count (e.g. 128 / 4)")
    _require(m.tiny_rope_theta > 1, f"model.tiny_rope_theta={m.tiny_rope_theta} must be > 1")
    _require(m.tiny_vision_hidden % 16 == 0,
             f"model.tiny_vision_hidden={m.tiny_vision_hidden} must be a multiple of 16 (2 heads, 2-D rotary halves)")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Check values that types alone do not catch. Paths are checked when `check_paths`."""
    d, m, lo, t = cfg.data, cfg.model, cfg.loss, cfg.train
    import math  # careless input (docs/reliability.md): inf/nan anywhere, an output dir that holds other things

    bad = [f"{s}.{k}={v!r}" for s, sec in cfg.to_dict().items() for k, v in sec.items()
           for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, float) and not math.isfinite(x)]
    _require(not bad, f"{', '.join(bad)}: must be a finite number (inf and nan are never a meaningful setting)")
    _require(bool(t.output_dir.strip()), "train.output_dir is empty; give a run directory, e.g. runs/my_run")
    out, cwd = os.path.realpath(t.output_dir), os.path.realpath(os.getcwd())
    project = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _require(out not in (os.path.realpath(os.sep), os.path.realpath(os.path.expanduser("~")))
             and not (out != cwd and os.path.commonpath([out, cwd]) == out)
             and os.path.commonpath([out, project]) != out,
             f"train.output_dir={t.output_dir!r} (-> {out}) is /, the home directory, a parent of the current "
             "directory, or the project (or a parent of it): a run writes and prunes files there; give a "
             "directory of its own, e.g. runs/my_run")
    _validate_tiny(m)
    _validate_sizes(cfg)
    _require(m.latent_size >= 1, f"model.latent_size={m.latent_size}: K must be >= 1 (the reference uses 8)")
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    _require(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    _require(d.shuffle_buffer >= 0, f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0")
    _require(d.max_length >= 16, f"data.max_length={d.max_length} is too small to hold one sample")
    _require(d.samples_per_epoch >= 0, f"data.samples_per_epoch={d.samples_per_epoch} must be >= 0")
    _require(0.0 <= d.max_skip_fraction <= 1.0, f"data.max_skip_fraction={d.max_skip_fraction} must be in [0, 1]")
    _require(d.max_image_pixels >= 1, f"data.max_image_pixels={d.max_image_pixels} must be >= 1")
    _require(d.min_pixels >= 0 and d.max_pixels >= 0, f"data.min_pixels={d.min_pixels} and data.max_pixels="
             f"{d.max_pixels} must be >= 0 (0 = the processor's own resize bound)")
    _require(not (d.min_pixels and d.max_pixels and d.min_pixels > d.max_pixels),
             f"data.min_pixels={d.min_pixels} must be <= data.max_pixels={d.max_pixels}")
    _require(d.max_member_bytes >= 1, f"data.max_member_bytes={d.max_member_bytes} must be >= 1")
    _require(d.max_sample_bytes >= d.max_member_bytes,
             f"data.max_sample_bytes={d.max_sample_bytes} must be >= data.max_member_bytes={d.max_member_bytes}")
    _require(0.0 < lo.coverage_p <= 1.0, f"loss.coverage_p={lo.coverage_p} must be in (0, 1]")
    _require(lo.temperature > 0, f"loss.temperature={lo.temperature} must be > 0")
    _require(lo.max_candidates >= 1, f"loss.max_candidates={lo.max_candidates} must be >= 1")
    _require(lo.target_noise >= 0, f"loss.target_noise={lo.target_noise} must be >= 0")
    _require(lo.w_ce >= 0 and lo.w_align >= 0, "loss.w_ce and loss.w_align must be >= 0")
    _require(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _validate_lora(m)
    _validate_parts(m, t)
    _require(not (d.packing and t.stage in ("2", "1+2")),
             f"data.packing=true with train.stage={t.stage!r}: stage 2 feeds latents through a KV cache segment by "
             "segment and needs padded batches; set data.packing=false, or train.stage='1' to pack stage 1 only")
    _validate_length(t)
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(0.0 <= t.ema_decay <= 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1] (the reference uses 0.999)")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _require(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1) (0.03 = 3% "
             "of train.max_steps)")
    _require(not (t.warmup_ratio > 0 and t.warmup_steps > 0),
             f"train.warmup_ratio={t.warmup_ratio:g} and train.warmup_steps={t.warmup_steps} both set the warmup: "
             "keep one (the other at 0)")
    _require(t.keep_last >= 1, f"train.keep_last={t.keep_last} must be >= 1")
    _require(t.save_every >= 0, f"train.save_every={t.save_every} must be >= 0 (0 = only at the end)")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    for name in ("health_max_weight_rms", "health_max_grad_norm", "health_loss_spike"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0 (0 turns the check off)")
    _require(t.stop_after >= 0, f"train.stop_after={t.stop_after} must be >= 0 (0 = run to train.max_steps)")
    _require(t.collective_timeout >= 10, f"train.collective_timeout={t.collective_timeout} must be >= 10 seconds")
    _require(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be >= 1")
    _require(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    _validate_periodic_eval(cfg)
    if not check_paths:
        return
    from data_pipeline.shards import expand_shards

    for name in ("train_shards", "eval_shards"):
        spec = getattr(d, name)
        if spec:
            try:
                expand_shards(spec, must_exist=True)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.{name}: {e}. Run ilvr-prepare first, or fix the path.") from None
    if d.processor:
        _check_processor_dir(d.processor)
    if m.name_or_path and m.name_or_path != "tiny":
        _check_model_dir(m.name_or_path)


# Counts that a loader or decoder allocates for: a worker holds data.batch_size samples (and
# data.shuffle_buffer more) before anything checks memory, so 1e12 ran it out of memory instead
# of failing here. Far above any real setting (the recipes use 1-8 and 64-1000), far below harm.
MAX_SIZES = {  # field: (most, what a larger value costs)
    "data.batch_size": (1024, "each loader worker holds that many samples per batch; use train.grad_accum "
                              "for a larger effective batch"),
    "data.shuffle_buffer": (100_000, "each loader worker holds that many samples"),
    "data.num_workers": (64, "each rank starts that many loader processes"),
    "eval.batch_size": (1024, "evaluation decodes that many prompts at once"),
}


def _validate_sizes(cfg: Config) -> None:
    """Refuse counts past MAX_SIZES, naming the field, the maximum and why."""
    for name, (most, why) in MAX_SIZES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        _require(value <= most, f"{name}={value} is more than {most}, the most allowed (MAX_SIZES in "
                                f"ilvr/config.py): {why}")


def _validate_lora(m: ModelConfig) -> None:
    lo = m.lora
    _require(lo.r >= 0, f"model.lora.r={lo.r} must be >= 0 (0 = no LoRA, full fine-tuning)")
    if lo.r == 0:
        return
    _require(lo.alpha > 0, f"model.lora.alpha={lo.alpha} must be > 0 (commonly 2 x model.lora.r)")
    _require(0.0 <= lo.dropout < 1.0, f"model.lora.dropout={lo.dropout} must be in [0, 1)")
    _require(bool(lo.target_modules.strip()), "model.lora.target_modules is empty; give 'all-linear' (the LM's "
             "linear layers) or layer names such as 'q_proj,v_proj'")
    _require(not m.freeze_llm, f"model.lora.r={lo.r} puts adapters on the language model, which model.freeze_llm=true "
             "freezes: set model.freeze_llm=false (the base stays frozen under LoRA anyway)")
    _require(m.freeze_vit and m.freeze_aligner, f"model.lora.r={lo.r} with a vision part trained in full "
             "(model.freeze_vit / freeze_aligner = false) is not supported: the teacher shares the frozen base and "
             "keeps EMA copies of the adapters only; keep both true, or model.lora.r=0")


def _validate_parts(m: ModelConfig, t: TrainConfig) -> None:
    """Per-part freezing and learning rates: something trains, and a multiplier is never silently unused."""
    _require(not (m.freeze_vit and m.freeze_aligner and m.freeze_llm),
             "model.freeze_vit, model.freeze_aligner and model.freeze_llm are all true: nothing would train; "
             "set model.freeze_llm=false (the usual choice) or unfreeze a vision part")
    for part, mult, frozen in (("vit", t.vit_lr_mult, m.freeze_vit), ("aligner", t.aligner_lr_mult, m.freeze_aligner)):
        _require(mult > 0, f"train.{part}_lr_mult={mult} must be > 0 (to keep the {part} fixed, set "
                 f"model.freeze_{part}=true)")
        _require(mult == 1.0 or not frozen, f"train.{part}_lr_mult={mult:g} has no effect while "
                 f"model.freeze_{part}=true: set model.freeze_{part}=false to train it, or drop the multiplier")


def _validate_periodic_eval(cfg: Config) -> None:
    """train.eval_every / keep_best (evaluation during training): shards to evaluate on, a metric the scorer makes."""
    t, e = cfg.train, cfg.eval
    _require(e.limit >= 0, f"eval.limit={e.limit} must be >= 0 (0 = every record)")
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = no evaluation during training)")
    _require(t.eval_every == 0 or bool(cfg.data.eval_shards.strip()),
             f"train.eval_every={t.eval_every} evaluates on data.eval_shards, which is empty: set data.eval_shards to "
             "held-out shards (ilvr-prepare), or train.eval_every=0")
    if not t.keep_best:
        return
    from ilvr.evaluation.scorers import RANKED_METRICS

    _require(t.eval_every > 0, f"train.keep_best={t.keep_best!r} keeps the checkpoint of the best evaluation during "
             "training, and train.eval_every=0 runs none: set train.eval_every (e.g. 500), or train.keep_best=''")
    metric = t.keep_best.removeprefix("eval/")
    _require(metric in RANKED_METRICS or metric.startswith("accuracy/"),
             f"train.keep_best={t.keep_best!r} is no metric the scorer makes: choose one of "
             f"{', '.join(RANKED_METRICS)} (or accuracy/<category>)")
    _require(metric != "success_rate" or e.benchmark in ("vsp", "auto"),
             f"train.keep_best='success_rate' is VSP's metric and eval.benchmark={e.benchmark!r}: use "
             "train.keep_best=accuracy")


def _validate_length(t: TrainConfig) -> None:
    """The run's length: train.max_steps or train.epochs (exclusive), stage 1's share likewise."""
    _require(t.epochs >= 0 and t.stage1_epochs >= 0,
             f"train.epochs={t.epochs} and train.stage1_epochs={t.stage1_epochs} must be >= 0 (0 = not used)")
    _require(not (t.epochs > 0 and t.max_steps != 0),
             f"train.epochs={t.epochs:g} and train.max_steps={t.max_steps} both set the run's length: keep one "
             "(train.max_steps=0 takes it from train.epochs; train.epochs=0 uses train.max_steps)")
    _require(t.epochs > 0 or t.max_steps >= 1,
             f"train.max_steps={t.max_steps} must be >= 1 (or 0 with train.epochs > 0: the length in epochs)")
    _require(not (t.stage1_epochs > 0 and t.stage1_steps != 0),
             f"train.stage1_epochs={t.stage1_epochs:g} and train.stage1_steps={t.stage1_steps} both set stage 1's "
             "length: keep one (train.stage1_steps=0 takes it from train.stage1_epochs)")
    _require(t.stage1_epochs == 0 or t.stage == "1+2",
             f"train.stage1_epochs={t.stage1_epochs:g} only applies to train.stage='1+2' (it is {t.stage!r})")
    if t.stage == "1+2" and t.stage1_epochs > 0 and t.epochs > 0:
        _require(t.stage1_epochs <= t.epochs,
                 f"train.stage1_epochs={t.stage1_epochs:g} must be <= train.epochs={t.epochs:g}")
    elif t.stage == "1+2" and t.stage1_epochs == 0 and t.max_steps > 0:
        _require(0 <= t.stage1_steps <= t.max_steps,
                 f"train.stage1_steps={t.stage1_steps} must be between 0 and train.max_steps={t.max_steps}")
    else:
        _require(t.stage1_steps >= 0, f"train.stage1_steps={t.stage1_steps} must be >= 0")


# what data_pipeline.tiny_processor.load_processor reads: a tokenizer and an image processor config
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _check_processor_dir(path: str) -> None:
    """data.processor must be a Hugging Face processor directory (a Qwen2.5-VL model dir holds one): checked
    here, because loading anything else fails a minute later with a message about sentencepiece."""
    _require(os.path.isdir(path), f"data.processor={path!r} is not a directory; give a local HF processor dir "
             "(a Qwen2.5-VL model directory holds one; scripts/quickstart.sh builds a tiny one)")
    names = set(os.listdir(path))
    missing = [what for what, files in (("tokenizer_config.json", ("tokenizer_config.json",)),
                                        (" or ".join(_TOKENIZER_FILES), _TOKENIZER_FILES),
                                        (" or ".join(_IMAGE_PROCESSOR_FILES), _IMAGE_PROCESSOR_FILES))
               if not names.intersection(files)]
    _require(not missing, f"data.processor={path!r} is not a processor directory: it has no {'; no '.join(missing)}. "
             "Point it at the model directory you train from (e.g. /models/Qwen2.5-VL-7B-Instruct), at a run's "
             "checkpoints/step-N/processor, or at the tiny processor scripts/quickstart.sh builds")


SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def _check_model_dir(path: str) -> None:
    """model.name_or_path must be a local Qwen2.5-VL / Qwen2-VL checkpoint: checked here (a config.json of a
    supported model type, safetensors weights), because loading anything else fails minutes later, after the
    ranks started, with a raw transformers error."""
    import json

    field = f"model.name_or_path={path!r}"
    _require(os.path.isdir(path), f"{field} is not a directory; give a local checkpoint directory or 'tiny'")
    config_path = os.path.join(path, "config.json")
    _require(os.path.isfile(config_path), f"{field} has no config.json: it is not a Hugging Face model directory. "
             "Give the directory of a downloaded Qwen2.5-VL model (e.g. /models/Qwen2.5-VL-7B-Instruct), an "
             "ilvr-export output, or 'tiny'")
    try:
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{field}: config.json is not a JSON object ({type(e).__name__}); re-download or "
                          "re-export the model") from None
    _require(model_type in SUPPORTED_MODEL_TYPES, f"{field} is a {model_type!r} model; ILVR-train trains "
             f"{' and '.join(SUPPORTED_MODEL_TYPES)} (Qwen2.5-VL / Qwen2-VL)")
    names = os.listdir(path)
    _require(any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names),
             f"{field} has a config.json but no *.safetensors weights; ILVR-train loads safetensors only (it "
             "never unpickles): download the safetensors files of the model, or convert the checkpoint")
