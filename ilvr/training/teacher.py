"""The momentum (EMA) teacher: a frozen copy of the student updated after every optimizer step.

    t <- d * t + (1 - d) * s          (d = train.ema_decay)

Under DeepSpeed ZeRO-3 the teacher is a second engine without optimizer, partitioned
exactly like the student, and the EMA runs on each rank's local partitions
(`param.ds_tensor`) with `torch._foreach` ops and no communication. Gathering every
parameter each step (as reference implementations do) costs a full all-gather per
step, and `GatheredParameters(modifier_rank=None)` silently throws the update away.

Parameters under `stage3_param_persistence_threshold` stay fully materialised on every
rank after the first forward; for those the EMA runs on the full tensor (each rank holds
the student's full copy after the step), and both the teacher's full copy and its shard
are written from the same fp32 result, so they never disagree. With ZeRO 0/1/2 every
parameter is a plain full tensor and the EMA runs on it.

The EMA state is kept in fp32 (a bf16 EMA at d = 0.999 stalls: (1 - d) * (s - t) is
below half an ulp of t) and rounded into the teacher's parameters after each update.
Each rank checkpoints its own buffers (`teacher_rank{r}.safetensors`): DeepSpeed's
save_checkpoint on an engine without optimizer hangs the other ranks. On another world size
(elastic resume) they are first joined into whole buffers (`teacher.safetensors`,
ilvr/training/elastic.py), and each rank cuts its partition from those exactly as the student's
new partitions are cut (`load_consolidated`).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

FILE_PATTERN = "teacher_rank{rank}.safetensors"
CONSOLIDATED_FILE = "teacher.safetensors"  # whole fp32 EMA buffers, independent of the world size (elastic resume)
# ZeRO++ features the teacher runs without (its primary partitions stay the student's): hpZ keeps a
# secondary copy of the weights for backward gathers, which a teacher never runs and which a shard-local
# EMA would leave stale; quantized weights change only how gathers travel. The student keeps them.
_STUDENT_ONLY_ZERO = {"zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                      "zero_quantized_nontrainable_weights": False}


def teacher_ds_config(student_config: dict) -> dict:
    """The teacher engine's DeepSpeed config: the student's partitioning and dtype, no optimizer or scheduler.

    ZeRO 1/2 partition only optimizer state, so a teacher without optimizer uses stage 0.
    ZeRO++ (hpZ secondary partitions, quantized weights) is the student's alone: the teacher gets
    the neutral values, so it keeps no second copy that a shard-local EMA would leave stale (its
    primary partitions, which the EMA updates, are the student's either way). NVMe parameter
    offload is refused: the teacher's shards would live in files the EMA does not update.
    """
    cfg = copy.deepcopy(student_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        cfg.pop(key, None)
    zero = cfg.get("zero_optimization", {})
    for key, neutral in _STUDENT_ONLY_ZERO.items():
        if key in zero:
            zero[key] = neutral
    if zero.get("offload_param", {}).get("device") == "nvme":
        raise ValueError("the momentum teacher does not support NVMe parameter offload (use cpu or none)")
    zero.pop("offload_optimizer", None)
    if int(zero.get("stage", 0)) < 3:
        zero["stage"] = 0
    cfg["zero_optimization"] = zero
    return cfg


class _readable:
    """Turns a safetensors read failure into `error` naming the file and the way out."""

    def __init__(self, path: str, error: type):
        self.path, self.error = path, error

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        from safetensors import SafetensorError

        if value is not None and isinstance(value, (SafetensorError, OSError, ValueError)) \
                and not isinstance(value, self.error):
            raise self.error(f"{self.path}: unreadable teacher state ({value}); resume from an earlier "
                             "checkpoint") from None
        return False


@dataclass
class _Slot:
    """One parameter pair. `full`: the EMA covers the whole tensor (persistent or unpartitioned),
    else only this rank's shard elements [start, start + valid) of the flattened parameter."""

    name: str
    student: torch.nn.Parameter
    teacher: torch.nn.Parameter
    partitioned: bool
    full: bool
    start: int = 0
    valid: int = 0

    def shard(self, param) -> torch.Tensor:
        """The real (unpadded) elements of `param`'s local partition."""
        return param.ds_tensor.narrow(0, 0, self.valid)

    def student_value(self) -> torch.Tensor:
        if not self.full:
            return self.shard(self.student)
        return self.student.data.view(-1)


def _local_bytes(param) -> int:
    """Bytes of `param` this rank holds: its ZeRO-3 partition (plus the full tensor if persistent), else all."""
    if hasattr(param, "ds_tensor"):
        full = param.data.numel() if param.data.numel() == param.ds_numel else 0
        return (param.ds_tensor.numel() + full) * param.element_size()
    return param.numel() * param.element_size()


def _partitioned_slot(name: str, student, teacher) -> _Slot:
    """The slot of a ZeRO-3 partitioned pair: where this rank's shard starts in the flat tensor and how many
    of its elements are real (the last rank's shard is padded)."""
    per_rank = student.ds_tensor.ds_numel
    start = per_rank * torch.distributed.get_rank(group=student.ds_process_group)
    valid = max(0, min(per_rank, student.ds_numel - start))
    return _Slot(name, student, teacher, partitioned=True, full=bool(student.ds_persist), start=start, valid=valid)


def materialised(param) -> bool:
    """Whether `param.data` holds the full tensor (always true for a parameter that is not partitioned)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not hasattr(param, "ds_id"):
        return True
    return param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel


class MomentumTeacher:
    """A frozen EMA copy of a DeepSpeed student, updated shard-locally with no collective.

    `teacher_model` must be built like the student (same class and config; under
    `deepspeed.zero.Init` if the student was); it is wrapped here by `deepspeed.initialize`
    with `teacher_ds_config(ds_config)` and starts as a copy of the student.
    """

    def __init__(self, student_engine, teacher_model: torch.nn.Module, ds_config: dict, decay: float):
        import deepspeed

        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1]")
        self.decay = decay
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        teacher_model.eval()
        self.engine, *_ = deepspeed.initialize(model=teacher_model, config=teacher_ds_config(ds_config))
        self.module.eval()
        self._start(self._pair(student_engine.module, self.module))

    def _start(self, slots: list[_Slot]) -> None:
        """EMA buffers from the student's trainable values; the teacher starts as a copy of the student."""
        self._slots = slots
        self._ema = [s for s in self._slots if s.student.requires_grad]
        with torch.no_grad(), self._student_full_values(self._ema):
            self._buffers = {s.name: s.student_value().float().clone() for s in self._ema}
        self._copy_frozen()
        self._write(self._ema)

    def _copy_frozen(self) -> None:
        """Frozen student parameters never change: copied (at build and after a load, which may have
        restored them), with no EMA state. Collective when some are persistent and not materialised."""
        frozen = [s for s in self._slots if not s.student.requires_grad]
        with torch.no_grad(), self._student_full_values(frozen):
            self._write(frozen, {s.name: s.student_value() for s in frozen})

    def active(self):
        """A context for the teacher's pass (the adapter teacher switches adapters in it)."""
        import contextlib

        return contextlib.nullcontext()

    def memory_bytes(self) -> int:
        """This rank's bytes held for the teacher alone: its weights (local partitions) and the EMA buffers."""
        weights = {id(s.teacher): s.teacher for s in self._slots}
        if hasattr(self, "engine"):
            weights.update({id(p): p for p in self.engine.module.parameters()})
        own = sum(_local_bytes(p) for p in weights.values())
        return own + sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def module(self) -> torch.nn.Module:
        """The HF model to call under torch.no_grad(), not inference_mode (ZeRO-3 hooks gather its weights
        inside the forward; weights made there must stay ordinary tensors that later updates can write)."""
        return self.engine.module

    def _pair(self, student: torch.nn.Module, teacher: torch.nn.Module) -> list[_Slot]:
        """Pair parameters by name and check that their partitions line up exactly."""
        s_params, t_params = dict(student.named_parameters()), dict(teacher.named_parameters())
        if s_params.keys() != t_params.keys():
            diff = sorted(s_params.keys() ^ t_params.keys())[:5]
            raise ValueError(f"teacher and student parameter names differ (e.g. {diff})")
        slots, problems = [], []
        for name, s in s_params.items():
            t = t_params[name]
            part = hasattr(s, "ds_id")
            if part != hasattr(t, "ds_id"):
                problems.append(f"{name}: partitioned in one model only")
                continue
            if not part:
                if s.shape != t.shape:
                    problems.append(f"{name}: shape {tuple(s.shape)} vs {tuple(t.shape)}")
                slots.append(_Slot(name, s, t, partitioned=False, full=True))
                continue
            s_key = (tuple(s.ds_shape), s.ds_numel, s.ds_tensor.ds_numel, bool(s.ds_persist))
            t_key = (tuple(t.ds_shape), t.ds_numel, t.ds_tensor.ds_numel, bool(t.ds_persist))
            if s_key != t_key:
                problems.append(f"{name}: (ds_shape, ds_numel, local partition numel, persistent) "
                                f"student {s_key} vs teacher {t_key}")
                continue
            slots.append(_partitioned_slot(name, s, t))
        if problems:
            raise ValueError("teacher partitions do not line up with the student's (build the teacher exactly "
                             "like the student, with the same ZeRO config):\n  " + "\n  ".join(problems[:10]))
        return slots

    def _student_full_values(self, slots: list[_Slot]):
        """A context making the student's persistent parameters whole if they are not (before its first
        forward). The only collective update() can issue; after an optimizer step it is a no-op."""
        import contextlib

        import deepspeed

        missing = [s.student for s in slots if s.partitioned and s.full and not materialised(s.student)]
        if not missing:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(missing, modifier_rank=None)  # read only

    def _write(self, slots: list[_Slot], values: dict | None = None):
        """Round `values` (default: the fp32 EMA buffers) into the teacher's shards and full copies."""
        values = self._buffers if values is None else values
        dst, src = [], []
        for s in slots:
            v = values[s.name]
            if s.partitioned:
                dst.append(s.shard(s.teacher))
                src.append(v.narrow(0, s.start, s.valid) if s.full else v)
            if s.full and materialised(s.teacher):
                dst.append(s.teacher.data.view(-1))
                src.append(v)
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)

    def update(self) -> float:
        """One EMA step from the student's current weights; returns the seconds it took."""
        started = time.perf_counter()
        with torch.no_grad(), self._student_full_values(self._ema):
            bufs = [self._buffers[s.name] for s in self._ema]
            src = [s.student_value() for s in self._ema]
            if all(b.dtype == v.dtype for b, v in zip(bufs, src)):  # one fused pass: b += (1-d)(s - b)
                torch._foreach_lerp_(bufs, src, 1.0 - self.decay)
            else:  # bf16 student shards into fp32 buffers
                torch._foreach_mul_(bufs, self.decay)
                torch._foreach_add_(bufs, src, alpha=1.0 - self.decay)
        self._write(self._ema)
        if bufs and bufs[0].is_cuda:
            torch.cuda.synchronize(bufs[0].device)
        return time.perf_counter() - started

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 EMA buffers (shards, or full tensors for persistent/unpartitioned parameters)."""
        return dict(self._buffers)

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        """Restore this rank's buffers (saved with the same world size and ZeRO config) and the teacher."""
        if state.keys() != self._buffers.keys():
            diff = sorted(state.keys() ^ self._buffers.keys())[:5]
            raise ValueError(f"teacher state keys differ from this teacher's (e.g. {diff})")
        for name, buf in self._buffers.items():
            if state[name].shape != buf.shape:
                raise ValueError(f"teacher state {name}: shape {tuple(state[name].shape)} vs {tuple(buf.shape)} "
                                 "(saved with another world size or ZeRO config?)")
            buf.copy_(state[name])
        self._write(self._ema)

    def save(self, directory: str, rank: int) -> str:
        """Write this rank's buffers to `directory`/teacher_rank{rank}.safetensors; every rank calls it."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE_PATTERN.format(rank=rank))
        tensors = {name: buf.detach().contiguous().cpu() for name, buf in self._buffers.items()}
        save_file(tensors, path + ".tmp", metadata={"decay": repr(self.decay)})
        os.replace(path + ".tmp", path)
        return path

    def load(self, directory: str, rank: int):
        """Restore from `directory`/teacher_rank{rank}.safetensors, or from `directory`/teacher.safetensors
        (whole buffers, written by an elastic conversion) when that is there (safetensors: nothing is
        unpickled). A damaged file is a CheckpointError naming it (resume normally catches it earlier,
        by its hash)."""
        from ilvr.training.checkpoint_verify import CheckpointError

        consolidated = os.path.join(directory, CONSOLIDATED_FILE)
        if os.path.isfile(consolidated):
            self.load_consolidated(consolidated)
        else:
            path = os.path.join(directory, FILE_PATTERN.format(rank=rank))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no teacher state for rank {rank}: {path}")
            with _readable(path, CheckpointError):
                from safetensors.torch import load_file

                state = load_file(path, device=str(self._device()))
            self.load_state_dict(state)
        self._copy_frozen()

    def load_consolidated(self, path: str):
        """Restore from whole fp32 buffers ({name: flat tensor}): each rank reads only its partition of each
        (the elements [start, start + valid) of its slot, as the student is partitioned now), or the whole
        tensor for persistent and unpartitioned parameters."""
        from safetensors import safe_open

        from ilvr.training.checkpoint_verify import CheckpointError

        state = {}
        with _readable(path, CheckpointError), safe_open(path, framework="pt", device=str(self._device())) as f:
            missing = sorted(set(self._buffers) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path}: no teacher buffer for {missing[:5]}")
            for s in self._ema:
                whole = f.get_slice(s.name)
                numel = int(torch.Size(whole.get_shape()).numel())
                expected = s.teacher.ds_numel if s.partitioned else s.teacher.numel()
                if numel != expected:
                    raise CheckpointError(f"{path}: teacher buffer {s.name!r} has {numel} elements, the "
                                          f"parameter {expected} (saved for another model?)")
                state[s.name] = whole[:] if s.full else whole[s.start:s.start + s.valid]
        self.load_state_dict(state)

    def _device(self):
        return next(iter(self._buffers.values())).device if self._buffers else "cpu"

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full teacher weights on CPU, on every rank (collective: call it on all ranks; tests/export).

        Only partitioned, non-materialised weights are gathered (read only); materialised persistent
        ones are read as they are, so they stay resident.
        """
        import deepspeed

        params = dict(self.module.named_parameters())
        missing = [p for p in params.values() if not materialised(p)]
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
            return {name: p.detach().cpu().clone() for name, p in params.items()}


class AdapterTeacher(MomentumTeacher):
    """The momentum teacher under LoRA: no second model. The student's module also holds a frozen "teacher"
    adapter (and teacher rows of the latent tokens, ilvr/model/lora.py); the EMA runs over the student's
    trainable weights into those, and the teacher's pass is the student's module with the teacher adapter
    active (`active()`, PEFT's set_adapter), in eval mode. The frozen base is shared: the teacher costs
    the adapter's size twice (its weights and their fp32 EMA), not a copy of the model.
    """

    def __init__(self, student_engine, peft_model, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1]")
        self.decay = decay
        self._student = student_engine.module
        self._peft = peft_model
        self._start(self._pair_adapters(self._student))

    @property
    def module(self) -> torch.nn.Module:
        """The student's module; call it inside `active()` (the teacher adapter on, eval mode, no grad)."""
        return self._student

    def active(self):
        import contextlib

        from ilvr.model.lora import STUDENT_ADAPTER, TEACHER_ADAPTER

        @contextlib.contextmanager
        def teacher_pass():
            training = self._student.training
            self._peft.set_adapter(TEACHER_ADAPTER, inference_mode=True)
            self._student.train(False)
            try:
                yield
            finally:
                self._peft.set_adapter(STUDENT_ADAPTER)  # the student's adapter trainable again, the teacher's frozen
                self._student.train(training)

        return teacher_pass()

    def _pair_adapters(self, module: torch.nn.Module) -> list[_Slot]:
        """Each trainable student weight with its teacher twin (".default" -> ".teacher" in the name)."""
        from ilvr.model.lora import STUDENT_ADAPTER, TEACHER_ADAPTER

        params = dict(module.named_parameters())
        slots, missing = [], []
        for name, s in params.items():
            if not s.requires_grad:
                continue
            twin = ".".join(TEACHER_ADAPTER if part == STUDENT_ADAPTER else part for part in name.split("."))
            t = params.get(twin)
            if t is None or twin == name:
                missing.append(name)
                continue
            part = hasattr(s, "ds_id")
            if not part:
                slots.append(_Slot(name, s, t, partitioned=False, full=True))
                continue
            slots.append(_partitioned_slot(name, s, t))
        if missing:
            raise ValueError(f"trainable weights without a teacher adapter twin (e.g. {missing[:3]}): under LoRA only "
                             "the adapters and the latent token rows may train")
        return slots

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's trainable weights (its adapter), whole, under the student's names (collective)."""
        import deepspeed

        params = [s.teacher for s in self._slots]
        missing = [p for p in params if not materialised(p)]
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
            return {s.name: s.teacher.detach().cpu().clone() for s in self._slots}
