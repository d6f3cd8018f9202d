"""Checkpoint integrity: the COMPLETE manifest (a sha256 per file), verification, weights-only loading.

Hostile files (docs/reliability.md): nothing is ever unpickled. Our files are JSON; DeepSpeed
0.19 calls torch.load(weights_only=False) on its own, so every load we trigger runs inside
`weights_only_loading()` (TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 + an allow-list of the few DeepSpeed
classes its files hold). COMPLETE records a sha256 per file (`{"format": 2, "sha256": {...}}`);
`verify_checkpoint` checks them and dry-loads every pickle weights-only before anything is loaded,
naming the file that fails. COMPLETE files written before the hashes ("ok") are accepted with a
warning (still weights-only). `--resume auto` skips checkpoints that fail (logged) for the newest
that verifies; an explicit checkpoint that fails is an error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import torch

from ilvr.fileio import fsync_tree, sha256_file, write_text_atomic
from ilvr.training.distributed import all_gather_json, rank_world

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = 2  # COMPLETE as JSON with a sha256 per file; before: the text "ok"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")  # files torch.load may be pointed at
# derived from a checkpoint after its save, with their own COMPLETE (ilvr/training/elastic.py): not its files
_DERIVED = re.compile(r"^universal(\.(tmp|trash)-.+)?$")
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (changed, truncated, or holding pickled code); names the file."""


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))



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


MAX_TRAINER_JSON = 64 << 20  # read before the checkpoint is verified: a planted giant file is not loaded


def read_trainer_state(checkpoint: str) -> dict:
    """<checkpoint>/trainer.json, read before verification ({} when unreadable or implausibly large: run_dir.py
    then takes the config from config.resolved.yaml; the checkpoint is verified when it is loaded)."""
    path = os.path.join(checkpoint, "trainer.json")
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_TRAINER_JSON:
            return {}
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


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
