"""Elastic resume (ilvr/training/elastic.py): a checkpoint saved on one world size resumes on another.

1. Exactness, on 2 gloo ranks -> 1 and 3 ranks (run_on_ranks, a tiny Qwen2.5-VL student + momentum
   teacher under ZeRO-3 with most parameters partitioned and padded, some persistent): after the
   conversion and load, the gathered fp32 master weights, Adam moments, optimizer step, LR, module
   weights and the teacher's fp32 EMA buffers equal the saved ones bit for bit; RNG of old ranks is
   restored, new ranks get the derived one; the converted form is cached, reused, verified, and a
   planted pickle in it is never run (the cache is converted again).
2. End to end through ilvr/train.py (torchrun): 2 ranks to step 4 -> 1 rank to step 6 -> 2 ranks to
   step 13 (the end of the first epoch): the run finishes into one MLflow run, steps 1-4 are the
   uninterrupted run's exactly, later steps within LOSS_TOLERANCE of it, and every sample of the
   epoch was trained on exactly once (ILVR_SAMPLE_LOG).
"""
from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import sys

import pytest
import torch

from ilvr.training.checkpoint_verify import COMPLETE, verify_checkpoint
from ilvr.training.elastic import ElasticCheckpointManager as CheckpointManager
from ilvr.training.elastic import UNIVERSAL, join_pieces, mean_moving_average, saved_rank_states
from ilvr.training.rng import derived_seed
from ilvr.training.spawn import run_on_ranks

# per-step |loss - uninterrupted 2-rank loss| after a world-size change: the global batch and the samples
# of each step differ from the uninterrupted run's (measured: at most 0.12, losses 6.6 -> 4.6 in 13 steps)
LOSS_TOLERANCE = 0.3


# ----------------------------------------------------------------------------- small pieces


def test_teacher_pieces_join_partitions_or_take_the_whole_copy():
    whole = torch.arange(7.0)
    assert torch.equal(join_pieces("w", [whole[:4], whole[4:]], 7, "f"), whole)  # partitions, rank order
    assert torch.equal(join_pieces("w", [whole, whole.clone()], 7, "f"), whole)  # persistent: whole everywhere
    with pytest.raises(Exception, match="neither partitions nor whole copies"):
        join_pieces("w", [whole[:4], whole[:4]], 7, "f")


def test_new_ranks_get_a_seed_of_their_own_and_statistics_are_averaged():
    assert derived_seed(4, 2) == derived_seed(4, 2) != derived_seed(4, 3) != derived_seed(5, 2)
    merged = mean_moving_average([{"avg": [1.0, 3.0], "weight": 0.5}, None, {"avg": [3.0, 5.0], "weight": 0.5}])
    assert merged == {"avg": [2.0, 4.0], "weight": 0.5}
    assert mean_moving_average([None, {"avg": None, "weight": 0.0}]) is None


# ----------------------------------------------------------------------------- 1. exactness on gloo ranks

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 2}},
    # the trainer's threshold (10 x hidden): most tensors partitioned (odd sizes: padded), norms persistent
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 640},
}  # fmt: skip


def ds_config(stage: int) -> dict:
    cfg = json.loads(json.dumps(DS_CONFIG))
    cfg["zero_optimization"]["stage"] = stage
    return cfg


def build(processor_dir: str, seed: int, stage: int = 3):
    """(student engine, momentum teacher), like the trainer builds them (vision frozen)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    import deepspeed

    from data_pipeline.tiny_processor import load_processor
    from ilvr.model.build import build_tiny_model, freeze_vision, init_latent_embeddings
    from ilvr.training.teacher import MomentumTeacher, teacher_ds_config

    processor, latent_ids = load_processor(processor_dir)

    def model(s):
        m = build_tiny_model(processor.tokenizer, processor.image_processor, seed=s)
        init_latent_embeddings(m, processor.tokenizer, latent_ids)
        freeze_vision(m)
        return m

    student = model(seed)
    engine, *_ = deepspeed.initialize(model=student, config=ds_config(stage),
                                      model_parameters=[p for p in student.parameters() if p.requires_grad])
    teacher = MomentumTeacher(engine, model(seed + 100), teacher_ds_config(ds_config(stage)), decay=0.7)
    return engine, teacher


def train_step(engine, teacher, rank: int, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(0, 200, (1, 12), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    teacher.update()
    return float(loss.detach())


def _gather_flat(t: torch.Tensor, numel: int) -> torch.Tensor:
    """The whole of a flat tensor partitioned over the ranks (DeepSpeed's padded equal shards)."""
    world = torch.distributed.get_world_size()
    per = -(-numel // world)
    padded = torch.zeros(per)
    padded[:t.numel()] = t
    parts = [torch.empty(per) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat(parts)[:numel]


def full_state(engine, teacher) -> dict[str, torch.Tensor]:
    """Everything that must carry over, gathered whole (collective): fp32 masters, Adam moments, module
    weights, teacher EMA buffers, optimizer step, LR, global step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    params = dict(engine.module.named_parameters())
    for name, p in params.items():
        if p.requires_grad:
            out[f"fp32/{name}"] = safe_get_full_fp32_param(p).clone()
            out[f"exp_avg/{name}"] = safe_get_full_optimizer_state(p, "exp_avg").clone()
            out[f"exp_avg_sq/{name}"] = safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        out.update({f"module/{k}": v.detach().clone() for k, v in params.items()})
    for slot in teacher._ema:
        buf = teacher.state_dict()[slot.name]
        out[f"teacher/{slot.name}"] = buf.clone() if slot.full else _gather_flat(buf, slot.teacher.ds_numel)
    out["teacher_partitioned"] = torch.tensor([sum(not s.full for s in teacher._ema)])
    out.update({f"teacher_module/{k}": v for k, v in teacher.gathered_state_dict().items()})
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values()]
    out["optimizer_step"] = torch.tensor(steps)
    out["lr"] = torch.tensor(engine.get_lr(), dtype=torch.float64)
    out["global_steps"] = torch.tensor([engine.global_steps])
    return out


def save_on_ranks(rank, world_size, out_dir: str, processor_dir: str, stage: int = 3):
    from safetensors.torch import save_file

    engine, teacher = build(processor_dir, seed=0, stage=stage)
    for s in range(3):
        train_step(engine, teacher, rank, s)
    state = full_state(engine, teacher)
    manager = CheckpointManager(out_dir, keep_last=0)
    path = manager.save(engine, 3, {"config": {}}, {"loader": {"rank": rank}},
                        lambda d: teacher.save(os.path.join(d, "teacher"), rank))
    draws = torch.rand(3).tolist()  # what the restored RNG must give
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "before.safetensors"))
    return {"path": path, "draws": draws}


def load_on_ranks(rank, world_size, path: str, processor_dir: str, stage: int = 3):
    from safetensors.torch import load_file

    engine, teacher = build(processor_dir, seed=1, stage=stage)  # another init: all must come from the checkpoint
    manager = CheckpointManager(os.path.dirname(os.path.dirname(path)))
    trainer_state, rank_state = manager.load(engine, path, lambda d: teacher.load(os.path.join(d, "teacher"), rank))
    draws = torch.rand(3).tolist()
    state = full_state(engine, teacher)
    result = {"rank_state": rank_state, "saved_world": trainer_state["world_size"], "draws": draws}
    if rank == 0:
        before = load_file(os.path.join(manager.output_dir, "before.safetensors"))
        assert before.keys() == state.keys(), sorted(before.keys() ^ state.keys())[:5]
        result["differ"] = [k for k in before if k != "teacher_partitioned" and not torch.equal(before[k], state[k])]
        result["teacher_partitioned"] = int(state["teacher_partitioned"])
        result["teacher_buffers"] = sum(k.startswith("teacher/") for k in before)
    loss = train_step(engine, teacher, rank, 7)  # the re-partitioned engine and teacher train on
    result["loss_finite"] = bool(torch.isfinite(torch.tensor(loss)))
    return result


def _run_elastic_load(world: int, path: str, processor_dir: str, saved_draws: list, stage: int = 3) -> list[dict]:
    results = run_on_ranks(load_on_ranks, world_size=world, timeout=300, path=path, processor_dir=processor_dir,
                           stage=stage)
    assert results[0]["differ"] == [], f"{world} ranks: not carried over exactly: {results[0]['differ'][:10]}"
    assert results[0]["teacher_buffers"] > 10
    for rank, r in enumerate(results):
        assert r["rank_state"] == {} and r["saved_world"] == 2 and r["loss_finite"]
        if rank < 2:
            assert r["draws"] == saved_draws[rank], "an old rank gets its own RNG state back"
        else:
            torch.manual_seed(derived_seed(3, rank))
            assert r["draws"] == torch.rand(3).tolist(), "a new rank's RNG is derived from (step, rank)"
    return results


@pytest.mark.slow
def test_two_ranks_resume_on_one_and_three_with_the_exact_state(tmp_path, tiny_processor_dir):
    out = str(tmp_path / "run")
    os.makedirs(out)
    saved = run_on_ranks(save_on_ranks, world_size=2, timeout=300, out_dir=out, processor_dir=tiny_processor_dir)
    path = saved[0]["path"]
    draws = [r["draws"] for r in saved]

    _run_elastic_load(1, path, tiny_processor_dir, draws)
    cache = os.path.join(path, UNIVERSAL)
    assert os.path.isfile(os.path.join(cache, COMPLETE)) and os.path.isfile(os.path.join(cache, "SOURCE.json"))
    assert os.path.isfile(os.path.join(cache, "teacher", "teacher.safetensors"))
    verify_checkpoint(cache)
    verify_checkpoint(path)  # the cache beside its files does not make the checkpoint look tampered with
    assert not glob.glob(path + "/universal.*"), "no temporary dir left behind"
    converted_at = os.stat(os.path.join(cache, COMPLETE)).st_mtime_ns

    results = _run_elastic_load(3, path, tiny_processor_dir, draws)  # odd world size: other padding
    assert results[0]["teacher_partitioned"] > 10, "most teacher buffers are cut into partitions (not persistent)"
    assert os.stat(os.path.join(cache, COMPLETE)).st_mtime_ns == converted_at, "converted once, then reused"

    # a planted pickle in the cache, COMPLETE rewritten to match: never run; the cache is converted again
    from tests.test_hostile_checkpoints import Planted, rehash

    marker = str(tmp_path / "pwned")
    victim = sorted(glob.glob(os.path.join(cache, "ds", "zero", "*", "fp32.pt")))[0]
    torch.save({"param": Planted(marker)}, victim)
    rehash(cache)
    _run_elastic_load(1, path, tiny_processor_dir, draws)
    assert not os.path.exists(marker), "the planted pickle ran"
    assert os.stat(os.path.join(cache, COMPLETE)).st_mtime_ns != converted_at
    verify_checkpoint(cache)


@pytest.mark.slow
def test_a_zero2_checkpoint_resumes_on_three_ranks_with_the_exact_state(tmp_path, tiny_processor_dir):
    # ZeRO-2: DeepSpeed's other universal loader, the teacher whole on every rank (stage 0), frozen parameters
    # from the saved module
    out = str(tmp_path / "run")
    os.makedirs(out)
    saved = run_on_ranks(save_on_ranks, world_size=2, timeout=300, out_dir=out, processor_dir=tiny_processor_dir,
                         stage=2)
    _run_elastic_load(3, saved[0]["path"], tiny_processor_dir, [r["draws"] for r in saved], stage=2)


# ----------------------------------------------------------------------------- 2. end to end (torchrun)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """48 synthetic VSP samples in 6 shards (as tests/test_train.py): 12 steps of 2 ranks x 2 per epoch."""
    from tests.factories import synthetic_vsp_shards

    return synthetic_vsp_shards(str(tmp_path_factory.mktemp("elastic_shards")), 48, seed=7)


# stage 1 throughout (the teacher carries over); 13 steps = the elastic run's first epoch: 2 ranks x 4 steps
# x 2 samples + 1 rank x 2 steps x 2 + 2 ranks x 7 steps x 2 = 48 samples
COMMON = ("train.max_steps=13", "train.stage=1", "train.save_every=0", "train.warmup_steps=1")


def run_part(out: str, shards: str, processor: str, nproc: int, *extra: str):
    import subprocess

    from tests.test_train import command, env

    e = dict(env(), ILVR_SAMPLE_LOG=os.path.join(out, "samples"))
    proc = subprocess.run(command(out, shards, processor, *COMMON, *extra, nproc=nproc), env=e, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def consumed_samples(out: str) -> collections.Counter:
    counts = collections.Counter()
    for path in glob.glob(os.path.join(out, "samples.rank*.jsonl")):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                counts.update((row["epoch"], tuple(s)) for s in row["samples"])
    return counts


@pytest.mark.slow
def test_two_ranks_then_one_then_two_finish_the_run(tmp_path, shards, tiny_processor_dir):
    from tests.test_train import metrics

    straight, elastic = str(tmp_path / "straight"), str(tmp_path / "elastic")
    run_part(straight, shards, tiny_processor_dir, 2)
    run_part(elastic, shards, tiny_processor_dir, 2, "train.stop_after=4", "train.keep_last=5")
    one = run_part(elastic, shards, tiny_processor_dir, 1, "train.stop_after=2", "train.keep_last=5")
    assert "saved by 2 ranks, this run has 1" in one.stderr and "re-planned for 1 ranks" in one.stderr
    two = run_part(elastic, shards, tiny_processor_dir, 2, "train.keep_last=5")
    assert "saved by 1 ranks, this run has 2" in two.stderr

    a, b = metrics(straight), metrics(elastic)
    assert sorted(b) == list(range(1, 14))
    for step in range(1, 5):  # before the first change: the same run
        assert b[step]["loss"] == a[step]["loss"]
    for step in range(5, 14):  # after: the same state, other batches
        assert abs(b[step]["loss"] - a[step]["loss"]) < LOSS_TOLERANCE, (step, a[step]["loss"], b[step]["loss"])
    assert b[13]["loss"] < b[4]["loss"] - 0.5, "training went on from the checkpoint, not from scratch"

    seen = consumed_samples(elastic)
    assert len(seen) == 48 and set(seen.values()) == {1}, "every sample of the epoch exactly once"
    first_epoch = {k for k in consumed_samples(straight) if k[0] == 0}  # its epoch 0 ends at step 12
    assert first_epoch == seen.keys()

    root = os.path.join(elastic, "checkpoints")
    for step in (4, 6):  # converted beside the checkpoint they came from; both still verify
        verify_checkpoint(os.path.join(root, f"step-{step}"))
        verify_checkpoint(os.path.join(root, f"step-{step}", UNIVERSAL))
    assert len(saved_rank_states(os.path.join(root, "step-13"), 2)) == 2

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(elastic)}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "one MLflow run goes on across world sizes"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == list(range(1, 14))
    shutil.rmtree(straight, ignore_errors=True)
