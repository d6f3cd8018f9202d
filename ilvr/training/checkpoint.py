"""Atomic, resumable checkpoints of a DeepSpeed run.

Layout (under `<output_dir>/checkpoints/`):

    latest                 text "step-<N>": the checkpoint to resume from (never one marked unhealthy)
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
healthy one, which pruning never removes, and `latest()` / `--resume auto` skip it (logged).

Hostile files (docs/reliability.md): nothing is ever unpickled. Our files are JSON; DeepSpeed
0.19 calls torch.load(weights_only=False) on its own, so every load we trigger runs inside
`weights_only_loading()` (TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 + an allow-list of the few DeepSpeed
classes its files hold). COMPLETE records a sha256 per file (`{"format": 2, "sha256": {...}}`);
`verify_checkpoint` checks them and dry-loads every pickle weights-only before anything is loaded,
naming the file that fails. COMPLETE files written before the hashes ("ok") are accepted with a
warning (still weights-only). `--resume auto` skips checkpoints that fail (logged) for the newest
that verifies; an explicit checkpoint that fails is an error. Temporary dirs are named per job
(`step-<N>.tmp-<host>-<pid>`); only the holder of `<output_dir>/.lock` (`lock_output_dir`, one
job per output dir) removes other jobs' leftovers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
from collections.abc import Callable

import torch

from ilvr.fileio import fsync_path, fsync_tree, sha256_file, write_text_atomic
from ilvr.training.distributed import all_gather_json, all_true, barrier, is_distributed, rank_world
from ilvr.training.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

DS_TAG = "ds"
LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_FILE = "trainer.json"
LOCK_FILE = ".lock"
MANIFEST_FORMAT = 2  # COMPLETE as JSON with a sha256 per file; before: the text "ok"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")  # files torch.load may be pointed at
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^(step-\d+\.tmp(-.*)?|\.trash-.*)$")  # crashed saves, half-removed checkpoints
# derived from a checkpoint after its save, with their own COMPLETE (ilvr/training/elastic.py): not its files
_DERIVED = re.compile(r"^universal(\.(tmp|trash)-.+)?$")
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (changed, truncated, or holding pickled code); names the file."""


class OutputDirBusy(RuntimeError):
    """Another live job holds `<output_dir>/.lock`; the message names it."""


# ----------------------------------------------------------------------------- files


def payload_files(root: str) -> list[str]:
    """Every file under `root` but COMPLETE, as sorted relative paths (symlinks included, to be refused).
    Derived forms beside the files (`universal/`, the elastic-resume cache, verified on its own) are not
    the checkpoint's."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        if dirpath == root:
            dirs[:] = [d for d in dirs if not _DERIVED.match(d)]
        out += [os.path.relpath(os.path.join(dirpath, name), root) for name in files]
    return sorted(p for p in out if p != COMPLETE)


def write_manifest(directory: str, hashes: dict[str, str]) -> None:
    """fsync every file of `directory`, then write its COMPLETE marker with the files' sha256 (`hashes`):
    the last write of a checkpoint (or of a form derived from one) before it is renamed into place."""
    fsync_tree(directory)
    write_text_atomic(os.path.join(directory, COMPLETE),
                      json.dumps({"format": MANIFEST_FORMAT, "sha256": hashes}, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- never unpickle


def deepspeed_checkpoint_types() -> list[type]:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and containers.

    Found by loading real checkpoints (ZeRO 0/1/2/3, fp32/bf16/fp16, 1-2 ranks) with weights_only=True:
    the ZeRO stage enum, the static and dynamic loss scalers, ZeRO-1/2 fragment addresses. Unpickling
    them only sets attributes (an enum lookup, dataclass fields): no code of the file's choosing runs.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading():
    """Inside: every torch.load is weights-only, whatever its caller passes (DeepSpeed passes
    weights_only=False), and accepts tensors, containers and `deepspeed_checkpoint_types()` only.
    The environment and torch's allow-list are restored on exit."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)  # torch refuses to load when both are set
    added = [t for t in deepspeed_checkpoint_types() if t not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(added):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def refusal_reason(e: BaseException) -> str:
    """The useful sentence of torch's weights-only error (it is long and tells you to unpickle)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    return (m.group(1) if m else text.strip().splitlines()[0] if text.strip() else type(e).__name__)[:300]


def _check_pickle(path: str) -> str | None:
    """Dry-load one torch file weights-only (mmap: tensor data is not read); the problem, or None."""
    try:
        with weights_only_loading():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 -- anything that does not load weights-only is refused
        return (f"{path}: refused by weights-only loading ({refusal_reason(e)}); it may hold pickled code "
                "and is never unpickled")
    return None


def _check_safetensors(path: str) -> str | None:
    """A safetensors file's header must parse and its data must end exactly at the end of the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size}")
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"{path}: unreadable safetensors file ({e}); truncated or damaged"
    return None


def _check_file(root: str, rel: str, hashes: dict | None) -> str | None:
    """The problem with one file of a checkpoint (hash first, then its format), or None."""
    path = os.path.join(root, rel)
    if os.path.islink(path) or not os.path.isfile(path):
        return f"{path}: missing or not a regular file (checkpoints hold plain files only)"
    if hashes is not None:
        try:
            digest = sha256_file(path)
        except OSError as e:
            return f"{path}: unreadable ({e})"
        if digest != hashes[rel]:
            return (f"{path}: sha256 {digest[:16]}... differs from the {str(hashes[rel])[:16]}... recorded in "
                    f"{COMPLETE} when it was saved (changed, truncated or replaced since)")
    if rel.endswith(PICKLE_SUFFIXES):
        return _check_pickle(path)
    if rel.endswith(".safetensors"):
        return _check_safetensors(path)
    return None


def recorded_hashes(path: str) -> dict[str, str] | None:
    """{relative path: sha256} from `<path>/COMPLETE`; None for a checkpoint saved before hashes ("ok")."""
    marker = os.path.join(path, COMPLETE)
    try:
        with open(marker, "rb") as f:
            raw = f.read(64 << 20)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker}: unreadable ({e})") from None
    if text.strip() == "ok":
        return None
    try:
        data = json.loads(text)
        hashes = data["sha256"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(hashes, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{marker}: not a COMPLETE marker this version writes ({e})") from None
    for rel, digest in hashes.items():
        inside = not os.path.isabs(rel) and ".." not in rel.split(os.sep) and rel != COMPLETE
        if not (inside and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise CheckpointError(f"{marker}: bad entry {rel!r}: {digest!r}")
    return hashes


def _plan(path: str) -> dict:
    """What verify_checkpoint checks: the files, their hashes, and problems with the marker itself."""
    if not is_complete(path):
        return {"files": [], "hashes": None, "problems": [f"{path}: not a complete checkpoint (no {COMPLETE})"]}
    try:
        hashes = recorded_hashes(path)
    except CheckpointError as e:
        return {"files": [], "hashes": None, "problems": [str(e)]}
    present = payload_files(path)
    files = sorted(hashes) if hashes is not None else present
    extra = [] if hashes is None else sorted(set(present) - set(hashes))
    problems = [f"{os.path.join(path, rel)}: not recorded in {COMPLETE} (added after the save)" for rel in extra]
    return {"files": files, "hashes": hashes, "problems": problems}


def verify_checkpoint(path: str, collective: bool = False) -> None:
    """Raise CheckpointError naming each bad file unless checkpoint `path` is safe to load: every file
    matches the sha256 recorded in COMPLETE (no file added), every torch file loads weights-only with
    the allow-list, every safetensors file is whole. Checkpoints saved before hashes were recorded
    get the format checks only (warning). `collective`: every rank calls it, the files are split
    over the ranks and all ranks get the same answer."""
    rank, world = rank_world() if collective else (0, 1)
    plan = _plan(path) if rank == 0 else None
    if collective:
        plan = all_gather_json(plan)[0]  # rank 0's view: every rank decides alike
    files = [] if plan["problems"] else plan["files"][rank::world]  # a bad marker: nothing else to check
    problems = list(plan["problems"]) if rank == 0 else []
    problems += [p for p in (_check_file(path, rel, plan["hashes"]) for rel in files) if p]
    if collective:
        problems = [p for part in all_gather_json(problems) for p in part]
    if problems:
        raise CheckpointError(f"checkpoint {path} is not safe to load:\n  - " + "\n  - ".join(problems[:10])
                              + "\nIt was changed or damaged after it was saved: resume from another "
                              "checkpoint (--resume auto picks the newest that verifies) or re-save it.")
    if plan["hashes"] is None and rank == 0:
        log.warning("%s was saved before per-file hashes were recorded: its files are not checked against "
                    "tampering or truncation (loading is still weights-only)", path)


# ----------------------------------------------------------------------------- one job per output dir

_HELD: dict[str, int] = {}  # realpath of an output dir -> the open, flock'ed lock file (kept for the process life)


def _lock_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
        job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"pid {holder['pid']} on {holder['host']}{job}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not recorded itself yet"


def holds_lock(output_dir: str) -> bool:
    """Whether this process holds `<output_dir>/.lock`."""
    return os.path.realpath(output_dir) in _HELD


def lock_output_dir(output_dir: str, setting: str = "train.output_dir") -> str:
    """Take `<output_dir>/.lock` (flock, exclusive, non-blocking) for the rest of this process's life and
    record the holder (host, pid, start time) in it; raise OutputDirBusy naming the holder if another
    process has it. The OS releases it when the process ends, however it ends. `setting` is the option
    that named the dir (`train.output_dir`, `ilvr-eval --out`), for the message."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    if holds_lock(output_dir):
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise OutputDirBusy(f"{setting}={output_dir!r} is in use by another job ({holder}; lock file "
                            f"{path}). Two jobs in one output dir overwrite each other's files (checkpoints, "
                            f"metrics, predictions): wait for it to end, stop it, or choose another {setting}") from None
    except OSError as e:
        os.close(fd)
        raise OutputDirBusy(f"cannot lock {path} ({e}); the file system must support flock") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_lock_holder()) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    _HELD[os.path.realpath(output_dir)] = fd
    return path


def claim_output_dir(output_dir: str, setting: str = "train.output_dir") -> None:
    """Collective: rank 0 takes the output dir's lock and every rank learns the outcome, so on a refusal
    all ranks raise OutputDirBusy with rank 0's message (none waits for the others)."""
    rank, _ = rank_world()
    error = None
    if rank == 0:
        try:
            lock_output_dir(output_dir, setting)
        except OutputDirBusy as e:
            error = str(e)
        except OSError as e:
            error = f"cannot create the lock in {setting}={output_dir!r}: {e}"
    error = all_gather_json(error)[0]
    if error:
        raise OutputDirBusy(error)


# ----------------------------------------------------------------------------- finding checkpoints


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


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
             save_teacher: Callable[[str], None] | None = None) -> str:
        """Write checkpoint `step` (collective: every rank calls it) and return its directory.

        extra_state (rank 0's is kept) goes to trainer.json, rank_state to rank<r>.json; both
        must be JSON-serialisable, which is checked on every rank before anything is written.
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
        failed = self._attempt(final, lambda: self._commit(tmp, final, hashes, healthy)) if rank == 0 else None
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

    def _commit(self, tmp: str, final: str, hashes: dict[str, str], healthy: bool = True) -> None:
        """Rank 0, after every rank wrote: fsync, COMPLETE (with the hashes), rename into place, point `latest`
        at it unless it is marked unhealthy (then `latest` keeps naming the newest healthy checkpoint)."""
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
        unhealthy), crashed .tmp dirs, trash."""
        current = latest(self.output_dir)
        doomed = []
        if self.keep_last > 0:
            doomed = [p for p in _complete_steps(self.root)[:-self.keep_last] if p != current]
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
