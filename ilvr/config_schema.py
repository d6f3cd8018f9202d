"""The run configuration's schema: one typed dataclass per section (data, model, loss, train, eval) and the
error every configuration mistake raises. Parsing lives in ilvr/config.py, range checks in ilvr/config_checks.py;
both import this module, which imports neither."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


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
    # which parts make the teacher's context query (ILVR_METHOD.md, stage 1 step 3): "user" (prompt + input
    # image), "context" (the assistant text before the segment), "previous" (the previous segment's picks).
    # All three is the method; fewer is a diagnostic (docs/method.md: what drives the selection)
    query_parts: str = "user,context,previous"
    # NOT the method (off by default): add change_weight x the standardised change of each candidate since the
    # previous image (1 - cosine to the same position in the previous helper image, or in the input image for
    # the first segment) to the standardised context scores, so the squares that changed are picked first.
    # The method's query favours what looks like what came before (docs/method.md, measured); 0 = faithful
    change_weight: float = 0.0


# metrics of the scorers' `aggregate` (ilvr/evaluation/scorers) that train.keep_best can rank checkpoints by, and
# which way is better; accuracy/<category> too (max). success_rate: VSP only. Here, not beside the scorers, because
# the config is checked before anything else is imported; tests/test_periodic_eval.py checks the scorers make them.
RANKED_METRICS = {"accuracy": "max", "success_rate": "max", "num_correct": "max", "unparseable": "min",
                  "unparseable_rate": "min"}


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
