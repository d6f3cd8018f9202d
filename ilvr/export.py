"""ilvr-export: a training checkpoint -> a Hugging Face model directory stock transformers loads.

    ilvr-export --checkpoint runs/x/checkpoints/step-500 --out exported/ [--processor DIR]

Contract with the trainer (what a checkpoint dir must hold; ilvr.training.checkpoint writes it):
  ds/                    DeepSpeed ZeRO shards under tag "ds" (engine.save_checkpoint(dir, tag="ds"))
  model_config/config.json  the student's config (model.config.save_pretrained), with
                         `ilvr_latent_token_ids` set by ilvr.model.build.init_latent_embeddings
  processor/             the processor (processor.save_pretrained), latent tokens included;
                         --processor overrides it
  trainer.json           {"step": N, "config": Config.to_dict(), optionally "stage": "1"|"2", ...}
  COMPLETE               the checkpoint finished saving

The exported dir holds the model (safetensors, the config), the processor with the latent
tokens, ilvr_settings.json (K, latent token strings and ids, stage, step, loss settings)
that ILVR inference needs besides the weights, plus `mlflow` (the training run's id and store, its
SQLite file also relative to the export, the URI without credentials: evaluations log beside their
training run), and a README.md with the loading snippet. Its
files get the user's umask (safetensors alone writes 0600), so a shared cluster group can read it. It is written to a sibling `<out>.tmp-<pid>` and
swapped in (old export renamed away, new renamed in, old deleted), so an interrupted export
never leaves a half directory at `out`. `--overwrite` only ever replaces an earlier export
(a dir with ilvr_settings.json), never `/`, the home dir, the current dir or one of its parents.
The checkpoint is verified (hashes, weights-only dry load) and consolidated weights-only:
nothing in it is unpickled (ilvr.training.checkpoint, docs/reliability.md). A run dir gives its
newest healthy checkpoint (ilvr/training/health.py); one marked unhealthy at its save needs
--allow-unhealthy, and NaN/Inf weights are never exported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import torch

from ilvr.model.ilvr_settings import SETTINGS_FILE, checkpoint_settings, latent_settings

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_model(model, processor, out_dir: str, settings: dict) -> str:
    """Save `model` (safetensors), `processor` and ilvr_settings.json (`settings` + latent tokens) to out_dir.

    `settings` must hold "latent_size"; the latent token ids are taken from the processor's
    tokenizer and must match the model config's `ilvr_latent_token_ids` when it has them.
    """
    if "latent_size" not in settings:
        raise ValueError("settings must hold latent_size (K)")
    full = {**settings, **latent_settings(processor.tokenizer, settings["latent_size"])}
    ids = [t["id"] for t in full["latent_tokens"].values()]
    recorded = getattr(model.config, "ilvr_latent_token_ids", None)
    if recorded is not None and list(recorded) != ids:
        raise ValueError(f"the model was trained with latent token ids {list(recorded)}, the processor has {ids}: "
                         "export with the processor used for training")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(processor.tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(processor.tokenizer)} tokens, the model only {rows} embedding rows")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, SETTINGS_FILE), "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2)
    with open(os.path.join(out_dir, README_FILE), "w", encoding="utf-8") as f:
        f.write(README_TEMPLATE.format(step=full.get("step"), stage=full.get("stage"), k=full["latent_size"]))
    apply_umask(out_dir)
    return out_dir


README_FILE = "README.md"
README_TEMPLATE = """# ILVR model (exported by ilvr-export)

Qwen2.5-VL weights trained with interleaved latent visual reasoning (step {step}, stage {stage}, K = {k}).
`ilvr_settings.json` holds what ILVR decoding needs besides the weights (K, latent token ids, scale).

```python
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torchvision_available

path = "."  # this directory
model = AutoModelForImageTextToText.from_pretrained(path)
if is_torchvision_available():  # stock transformers: `pip install "ilvr-train[vision]"` (or torchvision)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
else:  # without torchvision (e.g. the CPU quick start): ILVR-train's loader reads the same files
    from data_pipeline.tiny_processor import load_processor

    processor, latent_ids = load_processor(path)
```

Latent decoding and scoring: `ilvr-eval --model <this dir> --shards SHARDS --out DIR`, or
`ilvr.evaluation.loading.load_eval_model(path)` with `ilvr.model.generate.generate`.
"""


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it: set and restore at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str) -> None:
    """Give everything under `root` the permissions the user's umask asks for (files 0666 & ~umask, dirs 0777 &
    ~umask): safetensors writes 0600, which a shared group cannot read."""
    mask = current_umask()
    for directory, dirs, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def consolidated_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint's ZeRO shards (DeepSpeed's public zero_to_fp32 API),
    after verify_checkpoint and with weights-only loading: a hostile file is refused, naming it."""
    import pickle

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ilvr.training.checkpoint_verify import CheckpointError, verify_checkpoint, weights_only_loading

    verify_checkpoint(checkpoint)
    try:
        with weights_only_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="ds")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{checkpoint}/ds: a file there was refused by weights-only loading ({e}); "
                              "it is never unpickled") from None
    refuse_nonfinite(state, checkpoint)
    return state


def refuse_nonfinite(state: dict[str, torch.Tensor], checkpoint: str) -> None:
    """CheckpointError naming the weights that hold NaN/Inf: a diverged model is never exported or evaluated,
    whatever its health record says (checkpoints saved before health records have none)."""
    from ilvr.training.checkpoint_verify import CheckpointError

    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if t.is_floating_point()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        named = ", ".join(f"{name} ({n})" for name, n in list(bad.items())[:5])
        raise CheckpointError(f"{checkpoint}: {sum(bad.values())} NaN/Inf weights in {len(bad)} tensors: {named}. "
                              "The run diverged before this save; use an earlier checkpoint (a run dir picks its "
                              "newest healthy one)")


def model_from_checkpoint(checkpoint: str, dtype: torch.dtype = torch.float32, lora=None, latent_ids=None,
                          adapter_dir: "str | None" = None):
    """A stock HF model built from `<checkpoint>/model_config` holding the consolidated weights (strict).

    `lora` (ilvr.config.LoraConfig with r > 0; `latent_ids` then required): the checkpoint holds PEFT adapters;
    the model is rebuilt with them (and the teacher's, when saved), loaded strictly, and the student's adapter
    merged in: a stock model, loadable without peft. `adapter_dir`: also write the adapter alone in PEFT's
    format (adapter_config.json + adapter_model.safetensors) there."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(os.path.join(checkpoint, "model_config"), local_files_only=True)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    state = consolidated_state_dict(checkpoint)
    if lora is not None and lora.r > 0:
        from ilvr.model.lora import STUDENT_ADAPTER, TEACHER_ADAPTER, apply_lora, merged_model

        peft_model = apply_lora(model, lora, latent_ids, teacher=any(f".{TEACHER_ADAPTER}" in k for k in state))
        model.load_state_dict(state, strict=True)
        if adapter_dir:
            peft_model.save_pretrained(adapter_dir, selected_adapters=[STUDENT_ADAPTER])
        model = merged_model(peft_model)
    else:
        model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def mlflow_settings(checkpoint: str, trainer_state: dict, out_dir: str) -> "dict | None":
    """The training run's MLflow run id and store, for ilvr_settings.json: evaluations of the export then log
    beside their training run. The store comes from the run dir's mlflow_run.json (<run>/checkpoints/step-N)."""
    from ilvr.training.mlflow_store import connectable_uri, store_record
    from ilvr.training.run_record import read_state

    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    state = read_state(run_dir) or {}
    run_id = trainer_state.get("mlflow_run_id") or state.get("run_id")
    uri = connectable_uri(state.get("tracking_uri"), state.get("tracking_db"), run_dir) or state.get("tracking_uri")
    return store_record(uri, run_id, out_dir) if uri else None


def export_checkpoint(checkpoint: str, out_dir: str, processor_dir: str | None = None, dtype: str = "fp32",
                      overwrite: bool = False, adapter_dir: "str | None" = None, allow_unhealthy: bool = False) -> str:
    """Consolidate `checkpoint` and write the HF directory `out_dir` (via `<out_dir>.tmp` + rename); a LoRA
    run's adapters are merged in (and, with `adapter_dir`, also written alone in PEFT's format). A checkpoint
    marked unhealthy at its save is refused unless `allow_unhealthy`; NaN/Inf weights always are."""
    from data_pipeline.tiny_processor import load_processor

    if not os.path.isfile(os.path.join(checkpoint, "COMPLETE")):
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    from ilvr.training.health import unhealthy_reason

    why = unhealthy_reason(checkpoint)
    if why is not None and not allow_unhealthy:
        from ilvr.training.checkpoint_verify import CheckpointError

        raise CheckpointError(f"{checkpoint} was marked unhealthy when it was saved ({why}): not exported. Export "
                              "the run dir instead (its newest healthy checkpoint), or pass --allow-unhealthy to "
                              "export these weights anyway")
    if why is not None:
        log.warning("exporting %s although it is marked unhealthy (%s): --allow-unhealthy", checkpoint, why)
    processor_dir = processor_dir or os.path.join(checkpoint, "processor")
    check_out_dir(out_dir, overwrite, keep=(checkpoint, processor_dir))
    if not os.path.isdir(processor_dir):
        raise FileNotFoundError(f"no processor at {processor_dir}; pass --processor DIR")
    with open(os.path.join(checkpoint, "trainer.json"), encoding="utf-8") as f:
        trainer_state = json.load(f)
    settings = checkpoint_settings(trainer_state)
    record = mlflow_settings(checkpoint, trainer_state, out_dir)
    if record:
        settings["mlflow"] = record
    processor, latent_ids = load_processor(processor_dir)
    from ilvr.config import LoraConfig

    lora = LoraConfig(**((trainer_state.get("config") or {}).get("model", {}).get("lora") or {}))
    model = model_from_checkpoint(checkpoint, DTYPES[dtype], lora, latent_ids, adapter_dir)

    tmp = f"{os.path.normpath(out_dir)}.tmp-{os.getpid()}"  # this process's own: never another export's
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_model(model, processor, tmp, {**settings, "source_checkpoint": os.path.abspath(checkpoint)})
        check_out_dir(out_dir, overwrite, keep=(checkpoint, processor_dir))  # still an export we may replace?
        swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s", checkpoint, out_dir)
    return out_dir


def _inside(path: str, parent: str) -> bool:
    """Whether real path `path` is `parent` or lies under it."""
    return os.path.commonpath([path, parent]) == parent


class UnsafeOutput(ValueError):
    """An --out that must not be replaced; the message says why and what to do."""


def check_out_dir(out_dir: str, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Refuse an --out whose replacement could delete something else: `/`, the home dir, the current dir
    or a parent of it, a dir holding one of `keep` (the checkpoint, the processor), a symlink or file,
    and (even with overwrite) a non-empty dir that is not an earlier export (no ilvr_settings.json)."""
    real = os.path.realpath(out_dir)
    home = os.path.realpath(os.path.expanduser("~"))
    if real == os.path.realpath(os.sep) or real == home or _inside(os.path.realpath(os.getcwd()), real):
        raise UnsafeOutput(f"--out {out_dir!r} is / , the home directory, the current directory or a parent of it: "
                           "it is never replaced; give a new directory, e.g. --out exported/<name>")
    for path in filter(None, keep):
        if _inside(os.path.realpath(path), real) or _inside(real, os.path.realpath(path)):
            raise UnsafeOutput(f"--out {out_dir!r} holds or lies inside {path}, which the export reads: "
                               "choose another --out")
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise UnsafeOutput(f"--out {out_dir!r} is a symbolic link or a file: give a directory path")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    if not os.path.isfile(os.path.join(out_dir, SETTINGS_FILE)):
        raise UnsafeOutput(f"--overwrite only replaces an earlier export (a dir with {SETTINGS_FILE}); {out_dir} "
                           "is not one: choose another --out, or empty it yourself if you mean it")


def swap_in(new_dir: str, out_dir: str) -> None:
    """Put `new_dir` at `out_dir`: the old dir is renamed away, the new renamed in, then the old deleted
    (on a failed rename the old one is put back), so `out_dir` is always a whole export."""
    old = None
    if os.path.exists(out_dir):
        old = f"{os.path.normpath(out_dir)}.old-{os.getpid()}"
        os.replace(out_dir, old)
    try:
        os.replace(new_dir, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ilvr-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a step-<N> checkpoint dir, or a run dir (its latest)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--processor", default=None, help="processor dir (default: <checkpoint>/processor)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (a dir with "
                        f"{SETTINGS_FILE}; nothing else is ever replaced)")
    parser.add_argument("--adapter-out", default=None, metavar="DIR", help="a LoRA run: also write its adapter "
                        "alone in PEFT's format there (the export at --out has it merged in)")
    parser.add_argument("--allow-unhealthy", action="store_true", help="export a --checkpoint marked unhealthy at "
                        "its save (weights with NaN/Inf are refused all the same)")
    parser.add_argument("--best", action="store_true", help="with a run dir: the checkpoint of its best evaluation "
                        "during training (train.keep_best: checkpoints/best.json) instead of its latest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ilvr.training.checkpoint import describe_unhealthy, latest, no_healthy_checkpoint, read_best, unhealthy
    from ilvr.training.checkpoint_verify import CheckpointError, is_complete

    if args.best:
        best = None if is_complete(args.checkpoint) else read_best(args.checkpoint)
        if best is None:
            parser.error(f"--best: {args.checkpoint} is no run dir with checkpoints/best.json naming a complete "
                         "checkpoint (train.keep_best records it); drop --best for the latest one")
        log.info("ilvr-export: %s, the best by %s (%s = %.4g at step %s)", best["path"], best["metric"],
                 best["metric"], best["value"], best["step"])
        args.checkpoint = best["path"]
    checkpoint = args.checkpoint if is_complete(args.checkpoint) else latest(args.checkpoint)
    marked = [] if is_complete(args.checkpoint) else unhealthy(args.checkpoint)
    if checkpoint is None and marked:
        parser.exit(2, f"ilvr-export: error: {no_healthy_checkpoint(args.checkpoint, marked)}\n")
    if checkpoint is None:
        parser.error(f"{args.checkpoint} is neither a complete checkpoint nor a run dir with one")
    if marked:
        log.warning("ilvr-export: using %s, the newest healthy checkpoint of %s; skipped as unhealthy: %s",
                    checkpoint, args.checkpoint, describe_unhealthy(marked))
    try:
        export_checkpoint(checkpoint, args.out, args.processor, args.dtype, args.overwrite, args.adapter_out,
                          args.allow_unhealthy)
    except (CheckpointError, UnsafeOutput, FileExistsError, FileNotFoundError) as e:  # refusals: no traceback
        parser.exit(2, f"ilvr-export: error: {e}\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
