"""DeepSpeed JSON configs with "auto" values, resolved from the training config before any engine starts.

    ds = resolve_ds_config("ds_configs/zero3.json", cfg, world_size=2, hidden_size=3584)

Why: DeepSpeed itself drops or rejects "auto" without a word, so a config copied from LLaVA or
LLaMA-Factory would silently train with DeepSpeed's defaults (no clipping, lr 1e-3, fp32...).
Here every "auto" is replaced from `Config` and the model, explicit values are kept but checked
against the training config, and an "auto" nobody knows is an error that names its key path.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from ilvr.model.build import dtype_name

AUTO = "auto"
ADAM_EPS = 1e-8
# Floor of the "auto" reduce_bucket_size (elements). transformers' rule (h^2) suits h >= 1000, which it
# leaves unchanged; below that the gradient buckets shrink to a few KB, one reduce-scatter each (h=128:
# 39 per step instead of 1, same bytes; the quick start's stage-1 step 1.14x slower, docs/benchmarks.md).
MIN_AUTO_BUCKET = 1_000_000
SCHEDULER_FOR = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot be resolved; the message names the key path(s) and the fix."""


def load_ds_config(ds: "dict | str | os.PathLike") -> dict:
    """A private deep copy of a config dict, or the parsed JSON file; its value types checked
    (check_ds_types), so a typo fails here and not after the ranks have started."""
    if isinstance(ds, dict):
        data = copy.deepcopy(ds)
        check_ds_types(data, "the DeepSpeed config")
        return data
    path = os.fspath(ds)
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"DeepSpeed config {path!r} does not exist (see ds_configs/ for templates)")
    with open(path, "rb") as f:
        try:
            data = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DeepSpeedConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path!r} must hold a JSON object")
    check_ds_types(data, f"DeepSpeed config {path!r}")
    return data


# what DeepSpeed would otherwise reject with a raw traceback once every rank has started (or, worse, accept
# and misread); "auto" is left to resolve_ds_config, which fills it or names it
_MAPPINGS = ("zero_optimization", "optimizer", "optimizer.params", "scheduler", "scheduler.params", "bf16", "fp16",
             "zero_optimization.offload_optimizer", "zero_optimization.offload_param")
_COUNTS = {  # key path -> smallest allowed integer
    "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "steps_per_print": 1,
    **{f"zero_optimization.{k}": 0 for k in (
        "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance")},
    "zero_optimization.sub_group_size": 1,
}
_AUTO_COUNTS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold"}  # the ones resolve_ds_config fills
_NUMBERS = ("gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay", "optimizer.params.eps")
_BOOLS = ("bf16.enabled", "fp16.enabled", "wall_clock_breakdown", "zero_allow_untested_optimizer",
          "zero_optimization.overlap_comm", "zero_optimization.contiguous_gradients",
          "zero_optimization.stage3_gather_16bit_weights_on_model_save", "optimizer.params.torch_adam")
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("cpu", "nvme", "none")
_MISSING = object()


def _get(tree: dict, path: str) -> Any:
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _is_count(value: Any) -> bool:
    """An integer (JSON 5e8 counts: DeepSpeed takes integral floats), not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())


def _type_problems(tree: dict) -> list[str]:
    problems = []
    for path in _MAPPINGS:
        value = _get(tree, path)
        if value is not _MISSING and not isinstance(value, dict):
            problems.append(f"{path}={value!r} must be a JSON object ({{...}}), e.g. \"{path.split('.')[-1]}\": {{}}")
    stage = _get(tree, "zero_optimization.stage")
    if stage is not _MISSING and (isinstance(stage, bool) or stage not in ZERO_STAGES or not isinstance(stage, int)):
        problems.append(f"zero_optimization.stage={stage!r} must be the integer 0, 1, 2 or 3, "
                        "e.g. \"stage\": 3 (no quotes, no words)")
    for path, least in _COUNTS.items():
        value = _get(tree, path)
        if value is _MISSING or value == AUTO:
            continue
        if not _is_count(value) or value < least:
            problems.append(f"{path}={value!r} must be an integer >= {least}" + (
                " or \"auto\"" if path in _AUTO_COUNTS else ""))
    for path in _NUMBERS:
        value = _get(tree, path)
        if value is _MISSING or value == AUTO:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problems.append(f"{path}={value!r} must be a finite number >= 0 or \"auto\"")
    for path in _BOOLS:
        value = _get(tree, path)
        if value is not _MISSING and value != AUTO and not isinstance(value, bool):
            problems.append(f"{path}={value!r} must be true or false (JSON booleans, no quotes)")
    for section in ("offload_optimizer", "offload_param"):
        device = _get(tree, f"zero_optimization.{section}.device")
        if device is not _MISSING and device not in OFFLOAD_DEVICES:
            problems.append(f"zero_optimization.{section}.device={device!r} must be one of {list(OFFLOAD_DEVICES)}")
    return problems



def check_ds_types(tree: dict, source: str = "the DeepSpeed config") -> None:
    """Raise DeepSpeedConfigError listing every key of `tree` whose value has the wrong type or range
    (zero stage, sections that must be objects, counts, numbers, booleans, offload devices)."""
    problems = _type_problems(tree)
    if problems:
        raise DeepSpeedConfigError(f"{source} has values DeepSpeed cannot use:\n  - " + "\n  - ".join(problems)
                                   + "\nFix these keys (ds_configs/zero3.json shows working values).")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


class _Filler:
    """Fills one config tree in place and collects every conflict, so one error lists them all."""

    def __init__(self, tree: dict):
        self.tree = tree
        self.conflicts: list[str] = []

    def node(self, path: str, create: bool) -> "tuple[dict | None, str]":
        *parents, key = path.split(".")
        node = self.tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                if not create:
                    return None, key
                node[p] = {}
            node = node[p]
        return node, key

    def fill(self, path: str, value: Any, source: str, must_match: bool = True, add_missing: bool = False) -> None:
        """"auto" -> value; a missing key gets it too when `add_missing`; explicit values must match."""
        node, key = self.node(path, create=add_missing)
        if node is None:
            return
        if key not in node:
            if add_missing:
                node[key] = value
            return
        current = node[key]
        if current == AUTO:
            node[key] = value
        elif must_match and not _same(current, value):
            self.conflicts.append(f"{path}={current!r} in the DeepSpeed config conflicts with {source}={value!r}")


def _auto_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _auto_paths(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []


_WARMUP_KEYS = {"warmup_num_steps", "warmup_type", "last_batch_iteration"}
SCHEDULER_KEYS = {  # the keyword arguments of DeepSpeed's scheduler classes (deepspeed/runtime/lr_schedules.py)
    "WarmupLR": _WARMUP_KEYS | {"warmup_min_lr", "warmup_max_lr"},
    "WarmupDecayLR": _WARMUP_KEYS | {"warmup_min_lr", "warmup_max_lr", "total_num_steps"},
    "WarmupCosineLR": _WARMUP_KEYS | {"warmup_min_ratio", "cos_min_ratio", "total_num_steps"},
}


def warmup_steps(t) -> int:
    """The warmup in optimizer steps: train.warmup_steps, or train.warmup_ratio of train.max_steps rounded up
    (the HF Trainer's rule), once max_steps is known (train.epochs resolved)."""
    return t.warmup_steps or math.ceil(t.warmup_ratio * t.max_steps)


def scheduler_params(cfg, kind: str) -> "tuple[dict, dict]":
    """(params that must match the training config, params that only fill gaps) for a DeepSpeed scheduler.

    Warmup is linear and the decay ends at 0. DeepSpeed >= 0.19.6 rejects warmup_num_steps=0 and
    stretches any warmup to at least 2 steps, so without warmup the cosine and constant schedules
    "warm up" from the full lr. WarmupDecayLR decays towards warmup_min_lr, which must stay 0, so
    a linear schedule always has those 2 warmup steps.
    """
    t = cfg.train
    steps = warmup_steps(t)
    warmup = max(1, steps)
    flat = steps == 0
    match = {"warmup_num_steps": (warmup, "train.warmup_steps" if t.warmup_ratio == 0 else
                                  f"train.warmup_ratio={t.warmup_ratio:g} of train.max_steps={t.max_steps}")}
    if kind != "WarmupLR":
        match["total_num_steps"] = (t.max_steps, "train.max_steps")
    if kind == "WarmupCosineLR":
        gaps = {"warmup_min_ratio": 1.0 if flat else 0.0, "cos_min_ratio": 0.0, "warmup_type": "linear"}
        return match, gaps
    match["warmup_max_lr"] = (t.lr, "train.lr")
    gaps = {"warmup_min_lr": t.lr if flat and kind == "WarmupLR" else 0.0, "warmup_type": "linear"}
    return match, gaps


def _resolve_scheduler(out: dict, f: _Filler, cfg) -> None:
    kind = SCHEDULER_FOR[cfg.train.lr_schedule]
    sched = out.setdefault("scheduler", {})
    if not isinstance(sched, dict):
        raise DeepSpeedConfigError(f"scheduler must be a JSON object, got {sched!r}")
    if sched.get("type", AUTO) == AUTO:
        sched["type"] = kind
    elif sched["type"] != kind:
        f.conflicts.append(f"scheduler.type={sched['type']!r} in the DeepSpeed config conflicts with "
                           f"train.lr_schedule={cfg.train.lr_schedule!r} (which needs {kind!r})")
        return
    params = sched.setdefault("params", {})
    for key in [k for k in params if k not in SCHEDULER_KEYS[kind]]:
        if params[key] != AUTO:  # DeepSpeed would fail with "unexpected keyword argument"
            f.conflicts.append(f"scheduler.params.{key}={params[key]!r} is not a parameter of {kind} "
                               f"(chosen by train.lr_schedule={cfg.train.lr_schedule!r})")
        del params[key]  # "auto" for a parameter this schedule does not have: nothing to fill
    match, gaps = scheduler_params(cfg, kind)
    for key, (value, source) in match.items():
        f.fill(f"scheduler.params.{key}", value, source, add_missing=True)
    for key, value in gaps.items():
        f.fill(f"scheduler.params.{key}", value, "defaults", must_match=False, add_missing=True)


def resolve_ds_config(ds: "dict | str | os.PathLike", cfg, world_size: int, hidden_size: "int | None",
                      *, cuda: "bool | None" = None) -> dict:
    """Return a copy of `ds` with every "auto" replaced; raise DeepSpeedConfigError on conflicts.

    Training-config keys that are missing are added (DeepSpeed's own defaults -- no clipping,
    lr 1e-3, no scheduler -- would silently disagree with `cfg`); the optimizer and scheduler
    sections are created when absent. `cuda` overrides CUDA detection for dtype "auto".
    """
    if world_size < 1:
        raise DeepSpeedConfigError(f"world_size={world_size} must be >= 1")
    out = load_ds_config(ds)
    d, t = cfg.data, cfg.train
    f = _Filler(out)
    micro, accum = d.batch_size, t.grad_accum
    f.fill("train_micro_batch_size_per_gpu", micro, "data.batch_size", add_missing=True)
    f.fill("gradient_accumulation_steps", accum, "train.grad_accum", add_missing=True)
    f.fill("train_batch_size", micro * accum * world_size,
           f"data.batch_size*train.grad_accum*world_size ({micro}*{accum}*{world_size})", add_missing=True)
    f.fill("gradient_clipping", t.max_grad_norm, "train.max_grad_norm", add_missing=True)

    dtype = dtype_name(cfg.model.dtype, cuda)
    source = f"model.dtype={cfg.model.dtype!r} (-> {dtype}), so enabled"
    for name in ("bf16", "fp16"):
        f.fill(f"{name}.enabled", dtype == name, source, add_missing=dtype == name)

    if not isinstance(out.get("optimizer"), dict):
        out["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    out["optimizer"].setdefault("type", "AdamW")
    f.fill("optimizer.params.lr", t.lr, "train.lr", add_missing=True)
    f.fill("optimizer.params.betas", list(t.betas), "train.betas", add_missing=True)
    f.fill("optimizer.params.weight_decay", t.weight_decay, "train.weight_decay", add_missing=True)
    f.fill("optimizer.params.eps", ADAM_EPS, "default eps", must_match=False)
    _resolve_scheduler(out, f, cfg)

    hidden_keys = {"reduce_bucket_size": lambda h: max(h * h, MIN_AUTO_BUCKET),
                   "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                   "stage3_param_persistence_threshold": lambda h: 10 * h}
    zero = out.get("zero_optimization")
    wanted = [k for k in hidden_keys if isinstance(zero, dict) and zero.get(k) == AUTO]
    if wanted and not (isinstance(hidden_size, int) and hidden_size > 0):
        raise DeepSpeedConfigError(f"zero_optimization.{wanted[0]} is \"auto\" but the model's hidden size is "
                                   f"unknown ({hidden_size!r}); pass hidden_size or set a number in the config")
    for key in wanted:
        f.fill(f"zero_optimization.{key}", hidden_keys[key](hidden_size), "hidden size", must_match=False)

    if f.conflicts:
        raise DeepSpeedConfigError("DeepSpeed config disagrees with the training config:\n  - "
                                   + "\n  - ".join(f.conflicts)
                                   + "\nSet these keys to \"auto\" or change the training config.")
    left = _auto_paths(out)
    if left:
        raise DeepSpeedConfigError(f"DeepSpeed config has \"auto\" values nothing can fill: {', '.join(left)}. "
                                   "Replace them with numbers (DeepSpeed would ignore or reject them).")
    return out


def describe(resolved: dict) -> str:
    """Pretty JSON for the log."""
    return json.dumps(resolved, indent=2)


def save_resolved(resolved: dict, path: str) -> str:
    """Write the resolved config beside the run (atomically) so a run can be reproduced exactly."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(describe(resolved) + "\n")
    os.replace(tmp, path)
    return path
