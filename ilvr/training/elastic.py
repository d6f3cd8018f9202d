"""Elastic resume: continue a run on another number of ranks (docs/training.md, "Elastic resume").

A checkpoint holds ZeRO partitions cut for the world size that saved it. To load it on another
one, it is converted once, on rank 0, into a form that does not depend on the world size, and
cached beside it:

    step-N/universal/
      ds/                   DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal): per
                            parameter the full fp32 master weights and Adam moments, plus the optimizer's
                            common state (step, param groups, loss scaler) and the model_states files
                            (LR scheduler, global steps)
      latest_universal      written by the converter
      frozen.safetensors    parameters outside the optimizer (the frozen vision tower) and persistent
                            buffers, whole: DeepSpeed's universal loader restores only what its optimizer owns
      teacher/teacher.safetensors   the momentum teacher's fp32 EMA buffers, whole (consolidated from
                            teacher_rank<r>.safetensors); each rank cuts its new partition from it
      SOURCE.json           what was converted from what, and what does not carry over exactly
      COMPLETE              a sha256 per file, verified before every use like any checkpoint

It is written into `universal.tmp-<job>/` and renamed into place; a damaged cache is converted
again. The student is then loaded by DeepSpeed's own universal loader (ZeRO-1/2/3), which
re-partitions every tensor for the new world size by name; frozen parameters are written through
`deepspeed.zero.GatheredParameters(modifier_rank=0)`; the teacher is cut exactly like the student's
new partitions (MomentumTeacher.load_consolidated). Every file is read weights-only.

Also here, for the trainer: the data position re-planned for the new layout (every old worker's
stream replayed, shared out over the new ranks), RNG of ranks that did not exist (derived from
the step and the rank), and per-rank running statistics (the old ranks' mean).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import io
import json
import logging
import os
import pickle
import shutil
from typing import Any, Callable

import torch

from ilvr.fileio import fsync_path, sha256_file, write_text_atomic
from ilvr.training.checkpoint import DS_TAG, CheckpointManager, job_tag
from ilvr.training.checkpoint_verify import (CheckpointError, is_complete, payload_files, refusal_reason,
                                             verify_checkpoint, weights_only_loading, write_manifest)
from ilvr.training.distributed import all_gather_json, is_distributed, rank_world
from ilvr.training.rng import derived_seed, seed_all, set_rng_state

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # the cache's name inside a checkpoint dir (excluded from that checkpoint's own files)
SOURCE_FILE = "SOURCE.json"
FROZEN_FILE = "frozen.safetensors"
TEACHER_DIR = "teacher"
CONVERT_TIMEOUT_S = int(os.environ.get("ILVR_CONVERT_TIMEOUT", 4 * 3600))  # other ranks wait this long for rank 0
NOT_EXACT = [
    "the global batch is micro batch x accumulation x world size, so it changes with the world size: the losses "
    "go on from the same state but are not those of an uninterrupted run on the old world size",
    "RNG: ranks below the old world size restore their own saved state; new ranks derive theirs from the step",
    "per-rank running statistics (stage-1 target norm, fed-back latent mean): every rank starts from the old "
    "ranks' mean, so their cross-rank mean carries over, not each rank's own value",
    "the data position is re-planned: the rest of the interrupted epoch is shared out anew (exact mode: no "
    "sample twice or skipped, except top-up repeats that even out the workers; resampled mode: the sample "
    "budget carries over)",
]


# ----------------------------------------------------------------------------- the converted form


def universal_path(checkpoint: str) -> str:
    return os.path.join(checkpoint, UNIVERSAL)


def saved_world_size(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer.json"), encoding="utf-8") as f:
        return int(json.load(f)["world_size"])


def _zero_files(ds_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ds_dir, "*optim_states.pt")))


def _convert_deepspeed(src: str, out: str) -> None:
    """ds_to_universal on `src` (a tag dir), weights-only, its chatter kept out of the log."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    if not _zero_files(src):
        raise CheckpointError(f"{src}: no ZeRO optimizer partitions (*optim_states.pt); elastic resume supports "
                              "ZeRO stages 1-3 (ds_configs/zero2.json, zero3.json)")
    args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2 files of a data-parallel-only run lack it
    chatter = io.StringIO()
    try:
        with weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{src}: a file was refused by weights-only loading ({refusal_reason(e)}); it is never "
                              "unpickled") from None
    except Exception as e:
        log.error("ds_to_universal output:\n%s", chatter.getvalue()[-4000:])
        raise CheckpointError(f"converting {src} into a universal checkpoint failed: {type(e).__name__}: {e}") \
            from e
    log.debug("ds_to_universal output:\n%s", chatter.getvalue())


def _rank_of(path: str) -> int:
    return int(os.path.basename(path).split("_")[3])  # zero_pp_rank_<r>_mp_rank_00_model_states.pt


def consolidate_frozen(ds_dir: str, out_file: str) -> int:
    """Parameters outside the optimizer (frozen) and persistent buffers, whole, from the old ranks' model
    states: ZeRO-3 keeps each rank's partition of a frozen parameter (`frozen_param_fragments`), ZeRO-1/2
    the whole module. Returns the count."""
    from safetensors.torch import save_file

    zero3 = sorted(glob.glob(os.path.join(ds_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")), key=_rank_of)
    with weights_only_loading():
        if zero3:
            states = [torch.load(f, map_location="cpu", weights_only=True) for f in zero3]
            tensors = {name: _join_fragments(name, [st["frozen_param_fragments"][name] for st in states], shape,
                                             zero3[0])
                       for name, shape in (states[0].get("frozen_param_shapes") or {}).items()}
            module = states[0]["module"]
            tensors.update({b: module[b] for b in states[0].get("buffer_names") or [] if b in module})
        else:
            state = torch.load(os.path.join(ds_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                               weights_only=True)
            trainable = {name for group in state.get("param_shapes") or [] for name in group}
            tensors = {k: v for k, v in state["module"].items() if k not in trainable}
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, out_file)  # no shared storage
    return len(tensors)


def _join_fragments(name: str, fragments: list[torch.Tensor], shape, where: str) -> torch.Tensor:
    """A ZeRO-3 parameter from its ranks' (padded, equal) partitions."""
    numel = int(torch.Size(shape).numel())
    per = -(-numel // len(fragments))
    if any(f.numel() != per for f in fragments):
        raise CheckpointError(f"{where}: frozen parameter {name!r}: partitions of {[f.numel() for f in fragments]} "
                              f"elements, expected {per} each for {numel}")
    return torch.cat([f.reshape(-1) for f in fragments])[:numel].view(shape).clone()


def consolidate_teacher(src_dir: str, saved_world: int, numels: dict[str, int], out_file: str) -> int:
    """Join the old ranks' teacher files into one {name: full flat fp32 EMA buffer}; returns the count.

    A saved piece is the rank's partition (the pieces of all ranks, in rank order, make the parameter)
    or the whole tensor (persistent or unpartitioned parameters: every rank holds the same)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ilvr.training.teacher import FILE_PATTERN

    files = [os.path.join(src_dir, FILE_PATTERN.format(rank=r)) for r in range(saved_world)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{missing[0]}: missing; the teacher was saved by {saved_world} ranks")
    full, metadata = {}, {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        metadata = handles[0].metadata() or {}
        names = set(handles[0].keys())
        for f, h in zip(files, handles):
            if set(h.keys()) != names:
                raise CheckpointError(f"{f}: holds other parameters than {files[0]}")
        for name in sorted(names):
            if name not in numels:
                raise CheckpointError(f"{files[0]}: {name!r} is not a parameter of this model")
            full[name] = join_pieces(name, [h.get_tensor(name) for h in handles], numels[name], files[0])
    save_file(full, out_file, metadata={**metadata, "saved_world_size": str(saved_world)})
    return len(full)


def join_pieces(name: str, pieces: list[torch.Tensor], numel: int, where: str) -> torch.Tensor:
    """One parameter's full flat buffer from the old ranks' pieces (see consolidate_teacher)."""
    sizes = [p.numel() for p in pieces]
    if all(n == numel for n in sizes):
        return pieces[0].reshape(-1).contiguous()  # whole on every rank
    if sum(sizes) == numel:
        return torch.cat([p.reshape(-1) for p in pieces]).contiguous()  # partitions, in rank order
    raise CheckpointError(f"{where}: teacher buffer {name!r} has pieces of {sizes} elements for a parameter of "
                          f"{numel}: neither partitions nor whole copies")


def _write_source(tmp: str, checkpoint: str, saved_world: int, parts: list[str]) -> None:
    import deepspeed

    info = {"source": os.path.abspath(checkpoint), "saved_world_size": saved_world, "converted": parts,
            "deepspeed": deepspeed.__version__, "not_exact": NOT_EXACT,
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
    write_text_atomic(os.path.join(tmp, SOURCE_FILE), json.dumps(info, indent=1) + "\n")


def _commit(tmp: str, target: str) -> None:
    """Hash every file into COMPLETE, then rename tmp into place (a concurrent job's copy wins)."""
    write_manifest(tmp, {rel: sha256_file(os.path.join(tmp, rel)) for rel in payload_files(tmp)})
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another job converted it meanwhile: use that one (verified next)
    fsync_path(os.path.dirname(target))


def convert(checkpoint: str, numels: dict[str, int], tag: str) -> list[str]:
    """Rank 0: write `<checkpoint>/universal` (student + teacher), atomically; returns what was converted."""
    saved_world = saved_world_size(checkpoint)
    target = universal_path(checkpoint)
    if not os.access(checkpoint, os.W_OK):
        raise CheckpointError(f"{checkpoint} was saved by {saved_world} ranks and must be converted once for "
                              f"another world size, into {target}, but the directory is not writable: copy the "
                              "checkpoint into a writable run dir (with its parent's checkpoints/ layout) or resume "
                              f"on {saved_world} ranks")
    tmp = f"{target}.tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _convert_deepspeed(os.path.join(checkpoint, DS_TAG), os.path.join(tmp, DS_TAG))
        parts = ["student: fp32 master weights, Adam moments and step, LR scheduler, loss scaler (DeepSpeed "
                 "universal checkpoint)"]
        n = consolidate_frozen(os.path.join(checkpoint, DS_TAG), os.path.join(tmp, FROZEN_FILE))
        parts.append(f"student: {n} frozen parameters and buffers (outside the optimizer)")
        teacher = os.path.join(checkpoint, TEACHER_DIR)
        if os.path.isdir(teacher):
            from ilvr.training.teacher import CONSOLIDATED_FILE

            os.makedirs(os.path.join(tmp, TEACHER_DIR))
            n = consolidate_teacher(teacher, saved_world, numels, os.path.join(tmp, TEACHER_DIR, CONSOLIDATED_FILE))
            parts.append(f"momentum teacher: {n} fp32 EMA buffers consolidated from {saved_world} rank files")
        _write_source(tmp, checkpoint, saved_world, parts)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return parts


def _on_rank0(fn: Callable[[], Any]) -> None:
    """Run `fn` on rank 0 while the others wait (collective); a failure on rank 0 is raised on every rank.

    The others wait in a gloo barrier of a group made for it, with CONVERT_TIMEOUT_S: a conversion of
    a large model may outlast train.collective_timeout, the default group's limit."""
    rank, _ = rank_world()
    group = None
    if is_distributed():  # made by every rank before rank 0 starts (creating a group is itself collective)
        group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONVERT_TIMEOUT_S))
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- every rank must learn it, then raise
            error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            log.error("converting the checkpoint failed: %s", error)
    if group is not None:
        torch.distributed.barrier(group=group)
        torch.distributed.destroy_process_group(group)
    error = all_gather_json(error)[0]
    if error:
        raise CheckpointError(error)


def ensure_universal(checkpoint: str, numels: dict[str, int]) -> str:
    """`<checkpoint>/universal`, converted by rank 0 if it is not there yet, verified on every rank
    (collective). A cache that fails verification is moved aside and converted once more."""
    target = universal_path(checkpoint)
    tag = job_tag()
    rank, _ = rank_world()
    for attempt in (1, 2):
        def work() -> None:
            if is_complete(target):
                log.info("elastic resume: using the converted form %s", target)
                return
            started = datetime.datetime.now()
            parts = convert(checkpoint, numels, tag)
            log.info("elastic resume: converted %s in %.0f s into %s:\n  - %s", checkpoint,
                     (datetime.datetime.now() - started).total_seconds(), target, "\n  - ".join(parts))

        _on_rank0(work)
        try:
            verify_checkpoint(target, collective=is_distributed())
            return target
        except CheckpointError as e:
            if attempt == 2:
                raise
            if rank == 0:
                log.warning("elastic resume: the converted form does not verify (%s); converting again", e)
                trash = f"{target}.trash-{tag}"
                os.replace(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            all_gather_json(None)  # everyone waits for the removal
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def universal_loading(engine):
    """DeepSpeed's `"checkpoint": {"load_universal": true}` for one load_checkpoint call.

    DeepSpeed reads that setting only inside load_checkpoint (engine.load_universal_checkpoint(), which
    returns the parsed config's field) and nowhere at initialisation, so setting the parsed config field
    for the call is the same as building the engine with it; it is put back afterwards, so the next
    same-size checkpoint loads as usual. No DeepSpeed function is replaced.
    """
    config = getattr(engine, "_config", None)
    if config is None or not hasattr(config, "load_universal_checkpoint"):
        raise RuntimeError("this DeepSpeed version keeps its checkpoint.load_universal setting elsewhere: elastic "
                           "resume needs DeepSpeed 0.19 (see ilvr/training/elastic.py)")
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def parameter_numels(engine) -> dict[str, int]:
    """Full element count of each parameter of the engine's module (ZeRO-3 partitions included)."""
    return {name: int(getattr(p, "ds_numel", p.numel())) for name, p in engine.module.named_parameters()}


def load_resharded(engine, checkpoint: str, load_teacher: "Callable[[str], None] | None") -> str:
    """Load `checkpoint` (saved on another world size) into `engine` and the teacher (collective)."""
    saved_world = saved_world_size(checkpoint)
    _, world = rank_world()
    if rank_world()[0] == 0:
        log.warning("elastic resume: %s was saved by %d ranks, this run has %d: converting and re-partitioning",
                    checkpoint, saved_world, world)
    source = ensure_universal(checkpoint, parameter_numels(engine))
    try:
        with weights_only_loading(), universal_loading(engine):
            load_path, _ = engine.load_checkpoint(source, tag=DS_TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{source}: a file was refused by weights-only loading ({refusal_reason(e)}); it is "
                              "never unpickled") from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {source}/{DS_TAG}")
    restore_frozen(engine, os.path.join(source, FROZEN_FILE))
    if load_teacher is not None:  # after the frozen parameters: the teacher copies those from the student
        load_teacher(source)
    if rank_world()[0] == 0:
        log.warning("elastic resume from %d to %d ranks; carried over exactly: student weights, optimizer state "
                    "(fp32 master weights, Adam moments, step), LR schedule, momentum teacher (fp32 EMA buffers), "
                    "step, MLflow run. Not exactly:\n  - %s", saved_world, world, "\n  - ".join(NOT_EXACT))
    return source


def restore_frozen(engine, path: str) -> None:
    """Write the whole tensors of `path` into the engine's parameters and buffers of those names (collective:
    every rank loads them; under ZeRO-3 rank 0's write is broadcast and re-partitioned, one at a time)."""
    import deepspeed
    from safetensors import safe_open

    params, buffers = dict(engine.module.named_parameters()), dict(engine.module.named_buffers())
    with safe_open(path, framework="pt", device="cpu") as f:
        unknown = sorted(set(f.keys()) - params.keys() - buffers.keys())
        if unknown:
            raise CheckpointError(f"{path}: {unknown[:5]} are not in this model (another model?)")
        for name in sorted(f.keys()):
            target = params.get(name, buffers.get(name))
            value = f.get_tensor(name)
            with deepspeed.zero.GatheredParameters([target], modifier_rank=0, enabled=hasattr(target, "ds_id")), \
                    torch.no_grad():
                target.data.copy_(value.view(target.data.shape))


def restore_rank_rng(checkpoint: str, saved_world: int, step: int) -> None:
    """This rank's saved RNG states if the checkpoint has them (rank < saved world size), else derived ones."""
    rank, _ = rank_world()
    if rank < saved_world:
        with open(os.path.join(checkpoint, f"rank{rank}.json"), encoding="utf-8") as f:
            set_rng_state(json.load(f)["rng"])
        return
    seed_all(derived_seed(step, rank))


def saved_rank_states(checkpoint: str, saved_world: int) -> list[dict]:
    """The `rank_state` every old rank saved (rank<r>.json), in rank order."""
    states = []
    for r in range(saved_world):
        with open(os.path.join(checkpoint, f"rank{r}.json"), encoding="utf-8") as f:
            states.append(json.load(f)["state"])
    return states


class ElasticCheckpointManager(CheckpointManager):
    """A CheckpointManager that also loads a checkpoint saved on another world size: converted once into
    `<checkpoint>/universal` and re-partitioned (load_resharded); RNG of old ranks restored, new ranks
    derive theirs from the step (restore_rank_rng). The trainer's manager."""

    def load_other_world_size(self, engine, path: str, trainer_state: dict,
                              load_teacher: "Callable[[str], None] | None", restore_rng: bool) -> None:
        saved_world = int(trainer_state["world_size"])
        load_resharded(engine, path, load_teacher)
        if restore_rng:
            restore_rank_rng(path, saved_world, int(trainer_state.get("step", 0)))
        log.info("resumed from %s (step %s) on %d ranks instead of %d", path, trainer_state.get("step"),
                 rank_world()[1], saved_world)


# ----------------------------------------------------------------------------- data and statistics


def replan_loader(loader, states: list[dict]) -> None:
    """Carry the data position of `states` (every old rank's loader state) to this loader's layout
    (collective). Each rank replays a share of the old workers' streams; all learn what was consumed."""
    rank, world = rank_world()
    fp = states[0]["fingerprint"]
    workers = [(r, w) for r in range(int(fp["world_size"])) for w in range(int(fp["num_workers"]))]
    mine = [list(rg) for r, w in workers[rank::world] for rg in loader.replay_consumed(states[r], r, w)]
    done = [tuple(rg) for part in all_gather_json(mine) for rg in part]
    loader.load_replanned(states, done)


def mean_moving_average(states: list["dict | None"]) -> "dict | None":
    """One MovingAverage state from several ranks': the mean of those that have a value."""
    present = [s for s in states if s and s.get("avg") is not None]
    if not present:
        return None
    avg = torch.tensor([s["avg"] for s in present], dtype=torch.float64).mean(0)
    weight = sum(float(s.get("weight", 0.0)) for s in present) / len(present)
    return {"avg": avg.tolist(), "weight": weight}
