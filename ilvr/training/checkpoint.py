"""Atomic, resumable checkpoints of a DeepSpeed run.

Layout (under `<output_dir>/checkpoints/`):

    latest                 text "step-<N>": the checkpoint to resume from (never one marked unhealthy)
    best.json              with train.keep_best: {"checkpoint": "step-<N>", "metric", "value", "mode", "step"}, the
                           checkpoint of the best evaluation during training (never pruned; ilvr-export --best)
    step-<N>/
      ds/                  DeepSpeed's files (tag "ds"): student weights, optimizer, scheduler, ZeRO shards
      latest, zero_to_fp32.py  DeepSpeed's tag file ("ds") and recovery script
      teacher/ ...         whatever `save_teacher(dir)` writes (each rank its own file)
      model_config/        the student's HF config.json (for ilvr-export)
      processor/           the processor, when the manager was given one (for ilvr-export)
      trainer.json         rank 0: step, world_size, and the caller's extra_state (epoch, run id, config,
                           "health": the verdict of ilvr/training/health.py at the save, ...)
      rank<r>.json         rank r: its RNG states and the caller's rank_state (loader position, ...)
      COMPLETE             written last, with a sha256 per file: a directory without it is never loaded

Crash safety: all is written into `step-<N>.tmp-<job>/`; after every rank has finished (barrier)
the ranks hash the files, rank 0 fsyncs them, writes COMPLETE, renames the dir to `step-<N>`,
then replaces `latest` (temp file + os.replace). A crash before the rename leaves a `.tmp-<job>`
dir (ignored, removed by the next save); after it, `latest` still names the previous, complete
checkpoint.
Old checkpoints are renamed to `.trash-*` before removal: a half-deleted one never looks complete.
A checkpoint whose trainer.json marks it unhealthy is kept but not taken: `latest` stays on the newest
healthy one, which pruning never removes, and `latest()` / `--resume auto` skip it (logged). Pruning
never removes the checkpoint `best.json` names either; it is replaced (atomically, after the rename of the
new best checkpoint and before pruning) only by a save that is given `best`.

Nothing is ever unpickled: every file is verified and loaded weights-only (checkpoint_verify.py,
docs/reliability.md). Temporary dirs are named per job (`step-<N>.tmp-<host>-<pid>`); only the holder
of `<output_dir>/.lock` (run_lock.py, one job per output dir) removes other jobs' leftovers.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import socket
from collections.abc import Callable

from ilvr.fileio import fsync_path, sha256_file, write_text_atomic
from ilvr.training.checkpoint_verify import (COMPLETE, CheckpointError, is_complete, payload_files, refusal_reason,
                                             verify_checkpoint, weights_only_loading, write_manifest)
from ilvr.training.distributed import all_gather_json, all_true, barrier, is_distributed, rank_world
from ilvr.training.rng import rng_state, set_rng_state
from ilvr.training.run_lock import holds_lock

log = logging.getLogger(__name__)

DS_TAG = "ds"
LATEST = "latest"
BEST_FILE = "best.json"
TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^(step-\d+\.tmp(-.*)?|\.trash-.*)$")  # crashed saves, half-removed checkpoints


# ----------------------------------------------------------------------------- finding checkpoints


def _is_step_dir(root: str, name: str) -> bool:
    """A complete step-<N> directory that really lies in `root` (a symlink pointing elsewhere is not)."""
    path = os.path.join(root, name)
    return bool(_STEP_DIR.match(name)) and not os.path.islink(path) and os.path.isdir(path) and is_complete(path)


def _complete_steps(ckpt_root: str) -> list[str]:
    """Complete `step-<N>` directories, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, names) if m)
    return [os.path.join(ckpt_root, f"step-{n}") for n in steps if _is_step_dir(ckpt_root, f"step-{n}")]


def _pointed(root: str) -> str | None:
    """The checkpoint `<root>/latest` names, or None when it is missing or anything but a short UTF-8 file
    naming a complete step-<N> dir inside root (the caller then scans the step-<N> dirs)."""
    path = os.path.join(root, LATEST)
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):
            raise OSError("not a regular file")
        with open(path, "rb") as f:
            name = f.read(256).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s is unreadable (%s): using the newest complete checkpoint", path, e)
        return None
    if _is_step_dir(root, name):
        return os.path.join(root, name)
    log.warning("%s names %r, not a complete checkpoint in %s: using the newest complete one", path, name[:80], root)
    return None


def _candidates(output_dir: str, include_unhealthy: bool = False) -> list[str]:
    """Checkpoints to resume from, best first: the one `latest` names, then complete ones, newest first;
    without those marked unhealthy at their save (ilvr/training/health.py) unless `include_unhealthy`."""
    from ilvr.training.health import unhealthy_reason

    root = os.path.join(output_dir, "checkpoints")
    named = _pointed(root)
    found = ([named] if named else []) + [p for p in reversed(_complete_steps(root)) if p != named]
    return found if include_unhealthy else [p for p in found if unhealthy_reason(p) is None]


def unhealthy(output_dir: str) -> list[tuple[str, str]]:
    """(checkpoint, why) for every complete checkpoint of a run marked unhealthy at its save, newest first."""
    from ilvr.training.health import unhealthy_reason

    marked = [(p, unhealthy_reason(p)) for p in reversed(_complete_steps(os.path.join(output_dir, "checkpoints")))]
    return [(p, why) for p, why in marked if why is not None]


def describe_unhealthy(marked: list[tuple[str, str]]) -> str:
    """'step-3 (weight RMS ...), step-2 (...)' for log lines and errors."""
    return ", ".join(f"{os.path.basename(p)} ({why})" for p, why in marked[:5]) + (" ..." if len(marked) > 5 else "")


def no_healthy_checkpoint(output_dir: str, marked: list[tuple[str, str]]) -> str:
    """The error when every checkpoint of a run is marked unhealthy: which, why, and the ways on."""
    return (f"every checkpoint of {output_dir} is marked unhealthy: {describe_unhealthy(marked)}. The run "
            "diverged before its first healthy save; start again with a lower train.lr (--resume never with a "
            "new train.output_dir), or name a checkpoint explicitly (--resume PATH, ilvr-export --checkpoint PATH "
            "--allow-unhealthy) to use it anyway")


def latest(output_dir: str, include_unhealthy: bool = False) -> str | None:
    """The checkpoint to resume from: the one `latest` names if complete, else the newest complete one;
    only among checkpoints not marked unhealthy unless `include_unhealthy` (then: is there any checkpoint)."""
    found = _candidates(output_dir, include_unhealthy)
    return found[0] if found else None


def newest_verified(output_dir: str, collective: bool = False) -> str | None:
    """The best checkpoint of a run dir that passes verify_checkpoint; the ones skipped are logged with the
    reason. None when the run has none; CheckpointError when it has some and none verifies."""
    candidates, marked = _candidates(output_dir), unhealthy(output_dir)
    if collective:
        candidates, marked = all_gather_json([candidates, marked])[0]
    main = rank_world()[0] == 0 or not collective
    if marked and not candidates:
        raise CheckpointError(no_healthy_checkpoint(output_dir, marked))
    if marked and main:
        log.warning("resume: using %s, the newest healthy checkpoint; skipped as unhealthy: %s", candidates[0],
                    describe_unhealthy(marked))
    skipped = []
    for path in candidates:
        try:
            verify_checkpoint(path, collective)
        except CheckpointError as e:
            if main:
                log.warning("resume: skipping %s: %s", path, e)
            skipped.append(path)
            continue
        if skipped and main:
            log.warning("resume: using %s, the newest checkpoint that verifies (skipped: %s)", path,
                        ", ".join(skipped))
        if main:
            _warn_unknown_health(path)
        return path
    if skipped:
        raise CheckpointError(f"no checkpoint of {output_dir} is safe to load (skipped {', '.join(skipped)}; "
                              "reasons in the log): restore them, or start a new run: --resume never with a new "
                              "train.output_dir")
    return None


def _warn_unknown_health(path: str) -> None:
    """The log line for a chosen checkpoint that is not recorded healthy: unhealthy (taken because it was
    named) or without a record (saved before health checks: accepted)."""
    from ilvr.training.health import read_health, unhealthy_reason

    why = unhealthy_reason(path)
    if why is not None:
        log.warning("%s is marked unhealthy (%s): used because it was named explicitly", path, why)
    elif read_health(path) is None:
        log.warning("%s has no health record (saved before health checks): accepted as healthy-unknown", path)


def read_best(output_dir: str) -> "dict | None":
    """The record of `checkpoints/best.json` (train.keep_best) when it names a complete checkpoint, else None;
    its "path" is that checkpoint's directory."""
    root = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(root, BEST_FILE), encoding="utf-8") as f:
            record = json.load(f)
        name = str(record["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**record, "path": os.path.join(root, name)} if _is_step_dir(root, name) else None


def resolve_resume(arg: str | None, output_dir: str, collective: bool = False) -> str | None:
    """The checkpoint to load for `train.resume`, verified (verify_checkpoint): "never"/"" -> None; "auto" ->
    the newest checkpoint of output_dir that verifies (None if it has none); a checkpoint path -> that
    checkpoint (CheckpointError naming the file if it fails); a run dir -> its newest that verifies.
    `collective`: every rank calls it and gets the same answer."""
    if arg in (None, "", "never"):
        return None
    if arg == "auto":
        return newest_verified(output_dir, collective)
    if is_complete(arg):
        verify_checkpoint(arg, collective)
        if rank_world()[0] == 0 or not collective:
            _warn_unknown_health(arg)
        return arg
    if os.path.isdir(os.path.join(arg, "checkpoints")):
        found = newest_verified(arg, collective)
        if found:
            return found
    raise FileNotFoundError(f"resume={arg!r}: not a complete checkpoint (a step-<N> dir with {COMPLETE}) "
                            "nor a run directory with one; use 'auto', 'never' or such a path")


# ----------------------------------------------------------------------------- saving and loading


def job_tag() -> str:
    """This job, for names of its temporary dirs: rank 0's host and pid (file-name safe)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
    return all_gather_json(f"{host}-{os.getpid()}")[0]


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
        self._tag: str | None = None  # this job's, set at the first save (collective)

    def save(self, engine, step: int, extra_state: dict | None = None, rank_state: dict | None = None,
             save_teacher: Callable[[str], None] | None = None, best: "dict | None" = None) -> str:
        """Write checkpoint `step` (collective: every rank calls it) and return its directory.

        extra_state (rank 0's is kept) goes to trainer.json, rank_state to rank<r>.json; both
        must be JSON-serialisable, which is checked on every rank before anything is written.
        `best` (rank 0's; JSON): this checkpoint becomes the run's best (best.json), unless it is unhealthy.
        """
        rank, world = rank_world()
        final = os.path.join(self.root, f"step-{step}")
        trainer_json = None  # stays None if either state is not JSON
        try:
            rank_json = json.dumps({"rank": rank, "world_size": world, "step": step, "rng": rng_state(),
                                    "state": rank_state or {}})
            trainer_json = json.dumps({**(extra_state or {}), "step": step, "world_size": world}, indent=2)
        except (TypeError, ValueError) as e:
            log.error("checkpoint state is not JSON-serialisable: %s", e)
        if not all_true(trainer_json is not None):
            raise TypeError("extra_state / rank_state must be JSON-serialisable (see the log of the failing rank)")
        if self._tag is None:
            self._tag = job_tag()
        tmp = f"{final}.tmp-{self._tag}"  # per job: no other process ever touches it

        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step by this job
            os.makedirs(tmp)
        barrier()
        failed = self._attempt(final, lambda: self._write_payload(engine, tmp, rank, rank_json, trainer_json,
                                                                  save_teacher))
        self._agree(failed, tmp)  # every rank, instead of a barrier: one rank's failure ends the save on all
        hashes = self._hash_payload(tmp, rank, world)
        healthy = ((extra_state or {}).get("health") or {}).get("healthy", True)
        failed = self._attempt(final, lambda: self._commit(tmp, final, hashes, healthy, best)) if rank == 0 else None
        self._agree(failed, tmp)
        if rank == 0:
            self._prune()
        return final

    def _attempt(self, final: str, write: Callable[[], None]) -> "tuple[str, BaseException] | None":
        """Run this rank's part of a save; (message, error) when it failed, the message naming a full disk
        and the checkpoint dir when that is the cause (disk_full.py)."""
        from ilvr.training.disk_full import DiskFull, disk_full_condition, free_space

        try:
            write()
        except Exception as e:  # noqa: BLE001 -- reported to every rank, then raised
            condition = disk_full_condition(e)
            if condition is None:
                return f"rank {rank_world()[0]}: {type(e).__name__}: {e}", e
            message = (f"saving checkpoint {final} failed: {condition} ({free_space(self.root)} on the file system "
                       f"of {self.root}). The unfinished save was removed; the last checkpoint "
                       f"({latest(self.output_dir) or 'none yet'}) is intact. Free space there (or lower train.keep_last, or move train.output_dir), "
                       "then continue with --resume auto")
            full = DiskFull(message)
            full.__cause__ = e  # the writer's own error stays in the traceback
            return message, full
        return None

    def _agree(self, failed: "tuple[str, BaseException] | None", tmp: str) -> None:
        """Collective: if any rank's part failed, remove the unfinished dir (never marked complete) and raise
        on every rank: the failing rank its error (a disk-full one as DiskFull), the others one naming it."""
        messages = [m for m in all_gather_json(failed[0] if failed else None) if m]
        if not messages:
            return
        if rank_world()[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed is not None:
            raise failed[1]
        raise RuntimeError(f"the checkpoint save failed on another rank: {messages[0]}")

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

    @staticmethod
    def _hash_payload(tmp: str, rank: int, world: int) -> dict[str, str]:
        """sha256 of every file (collective: rank 0 lists them, each rank hashes its share)."""
        files = all_gather_json(payload_files(tmp) if rank == 0 else [])[0]
        mine = {rel: sha256_file(os.path.join(tmp, rel)) for rel in files[rank::world]}
        return {rel: digest for part in all_gather_json(mine) for rel, digest in part.items()}

    def _commit(self, tmp: str, final: str, hashes: dict[str, str], healthy: bool = True,
                best: "dict | None" = None) -> None:
        """Rank 0, after every rank wrote: fsync, COMPLETE (with the hashes), rename into place, point `latest`
        (and with `best`, best.json) at it unless it is marked unhealthy (then `latest` keeps naming the newest
        healthy checkpoint)."""
        write_manifest(tmp, hashes)
        if os.path.exists(final):  # the same step saved again (e.g. a signal right after a save)
            os.replace(final, self._trash_name(final))
        os.replace(tmp, final)
        fsync_path(self.root)
        if not healthy:  # the trainer logs the save and why it is unhealthy
            return
        pointer = os.path.join(self.root, LATEST)
        if os.path.isdir(pointer) and not os.path.islink(pointer):  # a bad pointer that no file can replace
            os.replace(pointer, self._trash_name(pointer))
        write_text_atomic(pointer, os.path.basename(final) + "\n")  # the trainer logs the save
        if best is not None:
            write_text_atomic(os.path.join(self.root, BEST_FILE),
                              json.dumps({**best, "checkpoint": os.path.basename(final)}, indent=2) + "\n")

    def _trash_name(self, path: str) -> str:  # a name `latest()` and the pruner never take for a checkpoint
        return os.path.join(self.root, f".trash-{os.path.basename(path)}-{self._tag or os.getpid()}")

    def _removable_leftover(self, name: str) -> bool:
        """A crashed save or half-removed checkpoint this process may delete: its own job's, or any when it
        holds the output dir's lock (then no other job can be writing here)."""
        if not _LEFTOVER.match(name) or not os.path.isdir(os.path.join(self.root, name)):
            return False
        return holds_lock(self.output_dir) or (self._tag is not None and name.endswith(f"-{self._tag}"))

    def _prune(self) -> None:
        """Remove checkpoints beyond keep_last (never the newest healthy one: `latest()` skips those marked
        unhealthy; never the best, best.json), crashed .tmp dirs, trash."""
        kept = {latest(self.output_dir), (read_best(self.output_dir) or {}).get("path")}
        doomed = []
        if self.keep_last > 0:
            doomed = [p for p in _complete_steps(self.root)[:-self.keep_last] if p not in kept]
        doomed += [os.path.join(self.root, n) for n in sorted(os.listdir(self.root)) if self._removable_leftover(n)]
        for path in doomed:  # renamed first (atomic): a half-deleted dir never looks complete
            trash = path if os.path.basename(path).startswith(".trash-") else self._trash_name(path)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            log.info("checkpoint removed: %s", path)

    def load(self, engine, path: str, load_teacher: Callable[[str], None] | None = None,
             restore_rng: bool = True, verify: bool = True) -> tuple[dict, dict]:
        """Load a complete checkpoint into `engine` (collective); return (trainer_state, rank_state).

        trainer_state: trainer.json (step, world_size, the saved extra_state); rank_state: this rank's
        saved rank_state, or {} when the checkpoint was saved on another world size (elastic resume, by
        load_other_world_size: this manager refuses, ilvr/training/elastic.py's ElasticCheckpointManager
        converts it once and re-partitions it; the caller re-plans per-rank state from
        elastic.saved_rank_states). RNG states are restored unless restore_rng=False (new
        ranks of an elastic resume get derived ones). The checkpoint is verified first (verify_checkpoint;
        verify=False when resolve_resume just did) and DeepSpeed reads it weights-only. Pass a freshly
        built engine: DeepSpeed cannot load ZeRO-3 state into one that has
        already run (its docs).
        """
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        if verify:
            verify_checkpoint(path, collective=is_distributed())
        with open(os.path.join(path, TRAINER_FILE), encoding="utf-8") as f:
            trainer_state = json.load(f)
        rank, world = rank_world()
        saved_world = int(trainer_state.get("world_size", world))
        if saved_world != world:  # ZeRO partitions of another world size
            self.load_other_world_size(engine, path, trainer_state, load_teacher, restore_rng)
            return trainer_state, {}
        self._load_same_size(engine, path, load_teacher)
        with open(os.path.join(path, f"rank{rank}.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if restore_rng:
            set_rng_state(saved["rng"])
        log.info("resumed from %s (step %s)", path, trainer_state.get("step"))
        return trainer_state, saved["state"]

    def load_other_world_size(self, engine, path: str, trainer_state: dict,
                              load_teacher: Callable[[str], None] | None, restore_rng: bool) -> None:
        """Load a checkpoint saved on another world size into `engine` (collective). Elastic resume
        (ilvr/training/elastic.py, ElasticCheckpointManager) converts it once and re-partitions it; this
        manager refuses."""
        raise CheckpointError(f"{path} was saved by {trainer_state.get('world_size')} ranks, this run has "
                              f"{rank_world()[1]}: loading it on another world size needs elastic resume "
                              "(ilvr.training.elastic.ElasticCheckpointManager)")

    @staticmethod
    def _load_same_size(engine, path: str, load_teacher: Callable[[str], None] | None) -> None:
        """DeepSpeed's and the teacher's state of a checkpoint saved on this world size."""
        try:
            with weights_only_loading():
                load_path, _ = engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{os.path.join(path, DS_TAG)}: a file there was refused by weights-only "
                                  f"loading ({refusal_reason(e)}); it is never unpickled") from None
        if load_path is None:  # DeepSpeed only logs a warning
            raise RuntimeError(f"DeepSpeed could not load {path}/{DS_TAG}")
        if load_teacher is not None:
            load_teacher(path)
