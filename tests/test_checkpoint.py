"""Checkpoints: atomic commit, crash safety, keep_last, `latest` fallback, resume semantics, exact resume.

The protocol is tested fast with a stand-in engine (a duck type with save/load_checkpoint);
one 2-rank ZeRO-3 run checks the real thing: a resumed engine has the saved parameters and
its next optimizer step equals the uninterrupted run's step.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from ilvr.training.checkpoint import CheckpointManager, latest, resolve_resume
from ilvr.training.checkpoint_verify import is_complete
from ilvr.training.rng import rng_state, set_rng_state
from ilvr.training.spawn import run_on_ranks


class FakeEngine:
    """The two DeepSpeed engine methods the manager calls, storing one number."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "state.json"), "w") as f:
            json.dump({"value": self.value}, f)

    def load_checkpoint(self, load_dir, tag, **kw):
        with open(os.path.join(load_dir, tag, "state.json")) as f:
            self.value = json.load(f)["value"]
        return load_dir, {}


class CrashingManager(CheckpointManager):
    """Dies after the DeepSpeed save and the other files, before the COMPLETE marker (on every rank)."""

    def _write_payload(self, *args, **kwargs):
        super()._write_payload(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash before the marker")


def draws() -> list:
    import numpy as np

    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def test_rng_state_round_trip_through_json():
    state = json.loads(json.dumps(rng_state()))
    expected = draws()
    set_rng_state(state)
    assert draws() == expected


def test_save_load_round_trip(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    path = manager.save(FakeEngine(1.5), 7, {"epoch": 2, "mlflow_run_id": "abc", "config": {"a": [1, 2]}},
                        {"loader": {"position": 5}}, save_teacher=lambda d: open(f"{d}/teacher.txt", "w").close())
    assert path == str(tmp_path / "checkpoints" / "step-7") and is_complete(path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-7"
    assert os.path.isfile(f"{path}/teacher.txt") and os.path.isfile(f"{path}/rank0.json")
    seen = []
    engine = FakeEngine()
    trainer, rank = manager.load(engine, path, load_teacher=seen.append)
    assert engine.value == 1.5 and seen == [path]
    assert trainer == {"epoch": 2, "mlflow_run_id": "abc", "config": {"a": [1, 2]}, "step": 7, "world_size": 1}
    assert rank == {"loader": {"position": 5}}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    manager.save(FakeEngine(1.0), 1)
    with pytest.raises(KeyboardInterrupt):
        CrashingManager(str(tmp_path), keep_last=2).save(FakeEngine(2.0), 2)
    root = tmp_path / "checkpoints"
    leftover = list(root.glob("step-2.tmp-*"))  # named per job: step-2.tmp-<host>-<pid>
    assert len(leftover) == 1 and (leftover[0] / "ds").is_dir() and not (root / "step-2").exists()
    assert latest(str(tmp_path)) == str(root / "step-1")
    engine = FakeEngine()
    manager.load(engine, resolve_resume("auto", str(tmp_path)))
    assert engine.value == 1.0
    manager.save(FakeEngine(2.0), 2)  # the next save replaces the leftover
    assert latest(str(tmp_path)) == str(root / "step-2") and not leftover[0].exists()


def test_keep_last_removes_old_checkpoints_but_never_latest(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(FakeEngine(step), step)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-3", "step-4"]
    # an earlier step saved again (a run resumed from an older checkpoint): `latest` names it, so it stays
    manager.save(FakeEngine(0), 2)
    assert latest(str(tmp_path)) == str(root / "step-2")
    assert sorted(os.listdir(root)) == ["latest", "step-2", "step-3", "step-4"]
    CheckpointManager(str(tmp_path), keep_last=0).save(FakeEngine(5), 5)  # 0 keeps all
    assert sorted(os.listdir(root)) == ["latest", "step-2", "step-3", "step-4", "step-5"]
    manager.save(FakeEngine(6), 6)
    assert sorted(os.listdir(root)) == ["latest", "step-5", "step-6"]
    manager.save(FakeEngine(6.5), 6)  # the same step again (a signal right after a save) replaces it
    assert sorted(os.listdir(root)) == ["latest", "step-5", "step-6"]
    engine = FakeEngine()
    manager.load(engine, latest(str(tmp_path)))
    assert engine.value == 6.5


def test_latest_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest(str(tmp_path)) is None
    for step, complete in ((3, True), (10, True), (12, False)):
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            (root / f"step-{step}" / "COMPLETE").write_text("ok")
    (root / "step-20.tmp").mkdir()
    assert latest(str(tmp_path)) == str(root / "step-10")  # no latest file
    (root / "latest").write_text("step-3\n")
    assert latest(str(tmp_path)) == str(root / "step-3")
    for stale in ("step-12", "step-99", "../step-3", ""):
        (root / "latest").write_text(stale)
        assert latest(str(tmp_path)) == str(root / "step-10")


def test_resolve_resume(tmp_path):
    out = str(tmp_path / "run")
    assert resolve_resume("never", out) is None and resolve_resume("auto", out) is None
    CheckpointManager(out).save(FakeEngine(), 4)
    step4 = os.path.join(out, "checkpoints", "step-4")
    assert resolve_resume("auto", out) == step4
    assert resolve_resume("never", out) is None
    assert resolve_resume(step4, str(tmp_path / "other")) == step4
    assert resolve_resume(out, str(tmp_path / "other")) == step4  # a run dir: its latest
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "missing"), out)


def test_the_elastic_cache_beside_a_checkpoint_is_not_one_of_its_files(tmp_path):
    from ilvr.training.checkpoint_verify import CheckpointError, verify_checkpoint

    path = CheckpointManager(str(tmp_path)).save(FakeEngine(), 4)
    for derived in ("universal", "universal.tmp-host-1", "universal.trash-host-1"):  # elastic.py's, own COMPLETE
        os.makedirs(os.path.join(path, derived, "ds"))
        open(os.path.join(path, derived, "ds", "x.pt"), "w").close()
    verify_checkpoint(path)
    os.makedirs(os.path.join(path, "ds", "universal"))  # only the top-level cache dir is set aside
    open(os.path.join(path, "ds", "universal", "x.json"), "w").close()
    with pytest.raises(CheckpointError, match="not recorded"):
        verify_checkpoint(path)


def test_state_that_is_not_json_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError):
        CheckpointManager(str(tmp_path)).save(FakeEngine(), 1, {"config": object()})
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- real DeepSpeed, 2 ranks

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
}  # fmt: skip


FULL_DISK_SAVE = r"""
import json, os, resource, signal, sys
import torch
from ilvr.training.checkpoint import CheckpointManager
from ilvr.training.disk_full import DiskFull

class TorchEngine:  # writes with PyTorch's own file writer, as DeepSpeed does
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"w": torch.zeros(100_000)}, os.path.join(save_dir, tag, "model_states.pt"))

manager = CheckpointManager(sys.argv[1], keep_last=2)
manager.save(TorchEngine(), 1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    manager.save(TorchEngine(), 2)
except DiskFull as e:
    print(json.dumps({"error": str(e), "cause": repr(e.__cause__)}))
"""


def test_a_save_on_a_full_disk_names_it_and_keeps_nothing_half_written(tmp_path):
    """Before: `RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...` (or `basic_ios::clear:
    iostream error`), naming neither the full disk nor the checkpoint."""
    import subprocess

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    root = out / "checkpoints"
    assert f"saving checkpoint {root / 'step-2'} failed: a file reached the file-size limit" in result["error"] \
        or f"saving checkpoint {root / 'step-2'} failed: the disk is full" in result["error"], result
    assert "GB free of" in result["error"] and f"the last checkpoint ({root / 'step-1'}) is intact" in result["error"]
    assert "RuntimeError" in result["cause"]  # PyTorch's own error, kept as the cause
    assert sorted(os.listdir(root)) == ["latest", "step-1"]  # no step-2, no step-2.tmp-*
    assert latest(str(out)) == str(root / "step-1")


class FullDiskOnRank1(FakeEngine):
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        if torch.distributed.get_rank() == 1:
            raise OSError(28, "No space left on device")
        super().save_checkpoint(save_dir, tag, client_state, save_latest)


def _save_with_a_full_disk_on_rank_1(rank, world_size, out_dir: str):
    manager = CheckpointManager(out_dir)
    manager.save(FakeEngine(1.0), 1)
    try:
        manager.save(FullDiskOnRank1(2.0), 2)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "saved"


def test_a_full_disk_on_one_rank_ends_the_save_on_every_rank_at_once(tmp_path):
    """Before: rank 1 raised a bare `OSError: [Errno 28]` and rank 0 was left in the barrier after the writes,
    knowing nothing; now every rank raises at once with the message naming the checkpoint and the full disk."""
    out = str(tmp_path / "run")
    rank0, rank1 = run_on_ranks(_save_with_a_full_disk_on_rank_1, world_size=2, timeout=60, out_dir=out)
    assert rank1.startswith(f"DiskFull: saving checkpoint {out}/checkpoints/step-2 failed: the disk is full"), rank1
    assert rank0 == f"RuntimeError: the checkpoint save failed on another rank: {rank1[len('DiskFull: '):]}"
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-1"]


def make_engine(processor_dir: str, seed: int):
    """A ZeRO-3 engine over a tiny Qwen2.5-VL (vision frozen, as in training)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # the shared-memory op DeepSpeed builds at init (~24 s cold): reuse scripts/test.sh's per-venv cache
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import deepspeed

    from data_pipeline.tiny_processor import load_processor
    from ilvr.model.build import build_tiny_model, freeze_vision, init_latent_embeddings

    processor, latent_ids = load_processor(processor_dir)
    model = build_tiny_model(processor.tokenizer, processor.image_processor, seed=seed)
    init_latent_embeddings(model, processor.tokenizer, latent_ids)
    freeze_vision(model)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine, processor


def train_step(engine, rank: int, step: int) -> float:
    """One optimizer step on a fixed text-only batch (different per rank and step)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(0, 200, (1, 12), generator=g)  # byte-level ids exist in any tiny vocab
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def local_shards(engine) -> torch.Tensor:
    """This rank's partition of every parameter, concatenated (same layout in same-shaped engines)."""
    return torch.cat([p.ds_tensor.detach().float().flatten().clone() for p in engine.module.parameters()])


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def save_teacher_shards(engine):
    """Stand-in for the teacher: each rank writes its own safetensors file (never save_checkpoint: TRAP 3)."""
    from safetensors.torch import save_file

    def save(ckpt_dir: str) -> None:
        rank = torch.distributed.get_rank()
        os.makedirs(os.path.join(ckpt_dir, "teacher"), exist_ok=True)
        save_file({"shards": local_shards(engine)}, os.path.join(ckpt_dir, "teacher", f"rank{rank}.safetensors"))

    return save


def resume_check(rank, world_size, out_dir: str, processor_dir: str):
    from safetensors.torch import load_file, save_file

    engine, processor = make_engine(processor_dir, seed=0)
    manager = CheckpointManager(out_dir, keep_last=2, processor=processor)
    losses = [train_step(engine, rank, s) for s in (1, 2)]
    at_step2 = local_shards(engine)
    config = {"model": {"latent_size": 4}, "train": {"stage": "1"}, "loss": {"w_ce": 1.0}}
    manager.save(engine, 2, {"epoch": 0, "config": config}, {"loader": rank}, save_teacher_shards(engine))
    after_save = torch.rand(2)
    continuous_loss = train_step(engine, rank, 3)
    continuous = local_shards(engine)
    try:
        CrashingManager(out_dir, keep_last=2).save(engine, 3, {"config": config}, {}, save_teacher_shards(engine))
    except KeyboardInterrupt:
        pass
    torch.distributed.barrier()
    path = resolve_resume("auto", out_dir)
    assert path.endswith("step-2"), path

    fresh, _ = make_engine(processor_dir, seed=1)
    assert not torch.equal(local_shards(fresh), at_step2)
    teacher = {}
    trainer_state, rank_state = manager.load(
        fresh, path, lambda d: teacher.update(load_file(os.path.join(d, "teacher", f"rank{rank}.safetensors"))))
    assert torch.equal(torch.rand(2), after_save)  # RNG restored
    assert trainer_state["step"] == 2 and trainer_state["config"] == config and rank_state == {"loader": rank}
    assert torch.equal(local_shards(fresh), at_step2) and torch.equal(teacher["shards"], at_step2)
    resumed_loss = train_step(fresh, rank, 3)
    assert resumed_loss == continuous_loss
    assert torch.equal(local_shards(fresh), continuous), (local_shards(fresh) - continuous).abs().max()

    final = manager.save(fresh, 3, {"epoch": 0, "config": config}, {"loader": rank})
    reference = full_state_dict(fresh)
    if rank == 0:
        save_file(reference, os.path.join(out_dir, "reference.safetensors"))
    return {"losses": losses, "final": final}


@pytest.mark.slow
def test_zero3_resume_is_exact_and_survives_a_crash(tmp_path, tiny_processor_dir):
    out = str(tmp_path / "run")
    results = run_on_ranks(resume_check, world_size=2, timeout=120, out_dir=out, processor_dir=tiny_processor_dir)
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-2", "step-3"]  # the crashed step-3.tmp was replaced
    step3 = results[0]["final"]
    for name in ("ds", "teacher", "model_config", "processor", "trainer.json", "rank0.json", "rank1.json"):
        assert os.path.exists(os.path.join(root, "step-2", name)), name
    assert sorted(os.listdir(os.path.join(step3, "ds"))) == sorted(os.listdir(os.path.join(root, "step-2", "ds")))
