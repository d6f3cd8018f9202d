"""Atomic, resumable checkpoints of a DeepSpeed run.

Layout (under `<output_dir>/checkpoints/`):

    latest                 text "step-<N>": the checkpoint to resume from
    step-<N>/
      ds/                  DeepSpeed's files (tag "ds"): student weights, optimizer, scheduler, ZeRO shards
      latest, zero_to_fp32.py  DeepSpeed's tag file ("ds") and recovery script
      teacher/ ...         whatever `save_teacher(dir)` writes (each rank its own file)
      model_config/        the student's HF config.json (for ilvr-export)
      processor/           the processor, when the manager was given one (for ilvr-export)
      trainer.json         rank 0: step, world_size, and the caller's extra_state (epoch, run id, config, ...)
      rank<r>.json         rank r: its RNG states and the caller's rank_state (loader position, ...)
      COMPLETE             written last: a directory without it is never loaded

Crash safety: all is written into `step-<N>.tmp/`; after every rank has finished (barrier)
rank 0 fsyncs the files, writes COMPLETE, renames the dir to `step-<N>`, then replaces
`latest` (temp file + os.replace). A crash before the rename leaves a `.tmp` dir (ignored,
removed by the next save); after it, `latest` still names the previous, complete checkpoint.
Old checkpoints are renamed to `.trash-*` before removal: a half-deleted one never looks complete.

Our files are JSON only (never pickle). DeepSpeed reads its own files with its torch loader,
unpickling (weights_only off, hard-coded in 0.19, no option): resume only from checkpoints you trust.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

DS_TAG = "ds"
LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.cpu().tolist())).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy (if installed), torch CPU and CUDA, as JSON-safe values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": _b64(torch.get_rng_state())}
    if importlib.util.find_spec("numpy"):
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    elif cuda:
        log.warning("%d CUDA RNG states saved, %d devices here: not restored", len(cuda), torch.cuda.device_count())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed() else (0, 1)


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank (so all ranks take the same branch)."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if _distributed():
        t = t.cuda() if torch.distributed.get_backend() == "nccl" else t
        torch.distributed.all_reduce(t)
    return int(t.item()) == 0


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write and fsync a small file, rename it into place (readers see old or new, never half), fsync the dir."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def _complete_steps(ckpt_root: str) -> list[str]:
    """Complete `step-<N>` directories, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, names) if m)
    return [p for p in (os.path.join(ckpt_root, f"step-{n}") for n in steps) if is_complete(p)]


def latest(output_dir: str) -> str | None:
    """The checkpoint to resume from: the one `latest` names if complete, else the newest complete one."""
    root = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            name = f.read().strip()
        if _STEP_DIR.match(name) and is_complete(os.path.join(root, name)):
            return os.path.join(root, name)
        log.warning("%s/latest names %r, not a complete checkpoint: using the newest complete one", root, name)
    except FileNotFoundError:
        pass
    steps = _complete_steps(root)
    return steps[-1] if steps else None


def resolve_resume(arg: str | None, output_dir: str) -> str | None:
    """The checkpoint to load for `train.resume`: "never"/"" -> None; "auto" -> latest(output_dir) (None if
    there is none); a path -> that complete checkpoint, or the latest one of a run directory at that path."""
    if arg in (None, "", "never"):
        return None
    if arg == "auto":
        return latest(output_dir)
    if is_complete(arg):
        return arg
    if os.path.isdir(os.path.join(arg, "checkpoints")):
        found = latest(arg)
        if found:
            return found
    raise FileNotFoundError(f"resume={arg!r}: not a complete checkpoint (a step-<N> dir with {COMPLETE}) "
                            "nor a run directory with one; use 'auto', 'never' or such a path")


class CheckpointManager:
    """Saves and loads `<output_dir>/checkpoints/step-<N>/`, keeping the newest `keep_last` (0 = all).

    `processor`, if given, is saved into every checkpoint (`processor/`) for ilvr-export;
    the student's HF config is saved from `engine.module.config` when it has one.
    """

    def __init__(self, output_dir: str, keep_last: int = 2, processor=None):
        self.output_dir = output_dir
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.processor = processor

    def save(self, engine, step: int, extra_state: dict | None = None, rank_state: dict | None = None,
             save_teacher: Callable[[str], None] | None = None) -> str:
        """Write checkpoint `step` (collective: every rank calls it) and return its directory.

        extra_state (rank 0's is kept) goes to trainer.json, rank_state to rank<r>.json; both
        must be JSON-serialisable, which is checked on every rank before anything is written.
        """
        rank, world = _rank_world()
        final = os.path.join(self.root, f"step-{step}")
        tmp = final + ".tmp"
        trainer_json = None  # stays None if either state is not JSON
        try:
            rank_json = json.dumps({"rank": rank, "world_size": world, "step": step, "rng": rng_state(),
                                    "state": rank_state or {}})
            trainer_json = json.dumps({**(extra_state or {}), "step": step, "world_size": world}, indent=2)
        except (TypeError, ValueError) as e:
            log.error("checkpoint state is not JSON-serialisable: %s", e)
        if not _all_true(trainer_json is not None):
            raise TypeError("extra_state / rank_state must be JSON-serialisable (see the log of the failing rank)")

        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step
            os.makedirs(tmp)
        _barrier()
        self._write_payload(engine, tmp, rank, rank_json, trainer_json, save_teacher)
        _barrier()
        if rank == 0:
            self._commit(tmp, final)
        _barrier()
        if rank == 0:
            self._prune()
        return final

    def _write_payload(self, engine, tmp: str, rank: int, rank_json: str, trainer_json: str,
                       save_teacher: Callable[[str], None] | None) -> None:
        """Everything but the marker: DeepSpeed state, teacher, JSON states, config and processor."""
        # save_latest: DeepSpeed's own `<dir>/latest` ("ds"), so its zero_to_fp32.py works without --tag
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={}, save_latest=True)
        if save_teacher is not None:
            save_teacher(tmp)
        write_text_atomic(os.path.join(tmp, f"rank{rank}.json"), rank_json)
        if rank == 0:
            config = getattr(getattr(engine, "module", None), "config", None)
            if hasattr(config, "save_pretrained"):
                config.save_pretrained(os.path.join(tmp, "model_config"))
            if self.processor is not None:
                self.processor.save_pretrained(os.path.join(tmp, "processor"))
            write_text_atomic(os.path.join(tmp, TRAINER_FILE), trainer_json)

    def _commit(self, tmp: str, final: str) -> None:
        """Rank 0, after every rank wrote: fsync, COMPLETE, rename into place, point `latest` at it."""
        _fsync_tree(tmp)
        write_text_atomic(os.path.join(tmp, COMPLETE), "ok\n")
        if os.path.exists(final):  # the same step saved again (e.g. a signal right after a save)
            os.replace(final, self._trash_name(final))
        os.replace(tmp, final)
        _fsync_path(self.root)
        write_text_atomic(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        log.info("checkpoint saved: %s", final)

    def _trash_name(self, path: str) -> str:  # a name `latest()` and the pruner never take for a checkpoint
        return os.path.join(self.root, f".trash-{os.path.basename(path)}-{os.getpid()}")

    def _prune(self) -> None:
        """Remove checkpoints beyond keep_last (never the one `latest` names), crashed .tmp dirs, trash."""
        current = latest(self.output_dir)
        doomed = []
        if self.keep_last > 0:
            doomed = [p for p in _complete_steps(self.root)[:-self.keep_last] if p != current]
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith(".trash-") or (name.endswith(".tmp") and os.path.isdir(path)):
                doomed.append(path)
        for path in doomed:  # renamed first (atomic): a half-deleted dir never looks complete
            trash = path if os.path.basename(path).startswith(".trash-") else self._trash_name(path)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("checkpoint removed: %s", path)

    def load(self, engine, path: str, load_teacher: Callable[[str], None] | None = None,
             restore_rng: bool = True) -> tuple[dict, dict]:
        """Load a complete checkpoint into `engine` (collective); return (trainer_state, rank_state).

        trainer_state: trainer.json (step, world_size, the saved extra_state); rank_state: this rank's
        saved rank_state. RNG states are restored unless restore_rng=False. Pass a freshly built
        engine: DeepSpeed cannot load ZeRO-3 state into one that has already run (its docs).
        """
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        with open(os.path.join(path, TRAINER_FILE), encoding="utf-8") as f:
            trainer_state = json.load(f)
        rank, world = _rank_world()
        if trainer_state.get("world_size", world) != world:  # ZeRO shards are not re-split here
            raise ValueError(f"{path} was saved by {trainer_state['world_size']} ranks, this run has {world}; "
                             "export it with ilvr-export and start a new run from the exported weights")
        load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:  # DeepSpeed only logs a warning
            raise RuntimeError(f"DeepSpeed could not load {path}/{DS_TAG}")
        if load_teacher is not None:
            load_teacher(path)
        with open(os.path.join(path, f"rank{rank}.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if restore_rng:
            set_rng_state(saved["rng"])
        log.info("resumed from %s (step %s)", path, trainer_state.get("step"))
        return trainer_state, saved["state"]
