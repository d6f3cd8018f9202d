"""Checks of a run configuration's values beyond their types (ilvr/config.py parses and types them): ranges,
combinations, sizes that would exhaust memory, paths. Each mistake raises ConfigError naming the field and
the fix."""
from __future__ import annotations

import os

from ilvr.config_schema import RANKED_METRICS, Config, ConfigError, ModelConfig, TrainConfig


QUERY_PARTS = ("user", "context", "previous")  # the parts of the stage-1 teacher's context query (loss.query_parts)


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
    parts = [q.strip() for q in lo.query_parts.split(",") if q.strip()]
    _require(bool(parts) and set(parts) <= set(QUERY_PARTS) and len(parts) == len(set(parts)),
             f"loss.query_parts={lo.query_parts!r}: give a comma-separated subset of {','.join(QUERY_PARTS)} "
             "(all three is the method)")
    _require(lo.change_weight >= 0, f"loss.change_weight={lo.change_weight} must be >= 0 (0 = the method)")
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
        check_processor_dir(d.processor)
    if m.name_or_path and m.name_or_path != "tiny":
        check_model_dir(m.name_or_path)


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
                                f"ilvr/config_checks.py): {why}")


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


def check_processor_dir(path: str) -> None:
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


def check_model_dir(path: str) -> None:
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
