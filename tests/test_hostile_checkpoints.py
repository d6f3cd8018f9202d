"""Hostile checkpoint files and careless use of output directories (docs/reliability.md).

A planted pickle must never run (resume, ilvr-export, the evaluation loader); the refusal names
the file. Damaged checkpoints are skipped by `--resume auto` and refused when named explicitly.
A bad `latest` pointer is ignored. One job per output dir (a lock); temporary dirs per job.
`ilvr-export --overwrite` replaces only an earlier export.

The planted object's unpickling creates a marker file (`open(marker, "w")`): what any pickled
code could do. Every test asserts that the marker never appears.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from ilvr.fileio import sha256_file
from ilvr.training import checkpoint_verify as ckpt
from ilvr.training import run_lock
from ilvr.training.checkpoint import CheckpointManager, latest, resolve_resume
from ilvr.training.checkpoint_verify import COMPLETE, CheckpointError, verify_checkpoint, weights_only_loading
from ilvr.training.run_lock import OutputDirBusy, lock_output_dir
from ilvr.training.spawn import run_on_ranks
from tests.conftest import REPO
from tests.test_checkpoint import CrashingManager, FakeEngine

PLANT = os.path.join("ds", "zero_pp_rank_0_mp_rank_00_model_states.pt")
TEACHER = os.path.join("teacher", "rank0.safetensors")
K = 4


class Planted:
    """Unpickling this creates `marker` (any code could run in its place)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rehash(checkpoint: str) -> None:
    """Rewrite COMPLETE with the current files' hashes: an attacker who controls every file."""
    files = ckpt.payload_files(checkpoint)
    hashes = {rel: sha256_file(os.path.join(checkpoint, rel)) for rel in files}
    with open(os.path.join(checkpoint, COMPLETE), "w") as f:
        json.dump({"format": ckpt.MANIFEST_FORMAT, "sha256": hashes}, f)


def plant(checkpoint: str, marker: str, mode: str) -> str:
    """Replace DeepSpeed's rank-0 model states with a pickle that creates `marker`; return its path.

    mode: "stale" (COMPLETE untouched: its hash no longer matches), "rehashed" (COMPLETE rewritten to
    match: only weights-only loading stands in the way), "legacy" (COMPLETE of an older version: "ok").
    """
    path = os.path.join(checkpoint, PLANT)
    torch.save({"module": Planted(marker), "ds_version": "0.19.8"}, path)
    if mode == "rehashed":
        rehash(checkpoint)
    elif mode == "legacy":
        with open(os.path.join(checkpoint, COMPLETE), "w") as f:
            f.write("ok\n")
    return path


def truncate(path: str, keep: int = 40) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


MODES = ["stale", "rehashed", "legacy"]


# ----------------------------------------------------------------------------- a real ZeRO-3 run (1 rank)


def save_two_checkpoints(rank, world_size, out_dir: str, processor_dir: str):
    """Two ZeRO-3 steps, a checkpoint after each, with a teacher stand-in (safetensors) and export metadata."""
    from tests.test_checkpoint import make_engine, save_teacher_shards, train_step

    engine, processor = make_engine(processor_dir, seed=0)
    manager = CheckpointManager(out_dir, keep_last=0, processor=processor)
    config = {"model": {"latent_size": K}, "train": {"stage": "1"}, "loss": {"w_ce": 1.0}}
    for step in (1, 2):
        train_step(engine, rank, step)
        manager.save(engine, step, {"config": config}, {"loader": rank}, save_teacher_shards(engine))


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, tiny_processor_dir) -> str:
    out = str(tmp_path_factory.mktemp("ds_run") / "run")
    run_on_ranks(save_two_checkpoints, world_size=1, timeout=180, out_dir=out, processor_dir=tiny_processor_dir)
    return out


@pytest.fixture
def run_copy(ds_run, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(ds_run, out)
    return out


def step(run: str, n: int) -> str:
    return os.path.join(run, "checkpoints", f"step-{n}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_planted_pickle_is_refused_naming_the_file_and_auto_resume_skips_it(run_copy, tmp_path, mode, caplog):
    marker = str(tmp_path / "MARKER")
    planted = plant(step(run_copy, 2), marker, mode)
    with pytest.raises(CheckpointError) as e:
        resolve_resume(step(run_copy, 2), run_copy)  # explicit: an error naming the file
    assert planted in str(e.value)
    with caplog.at_level(logging.WARNING, logger="ilvr.training.checkpoint"):
        assert resolve_resume("auto", run_copy) == step(run_copy, 1)  # auto: the newest that verifies
    assert planted in caplog.text and "skipping" in caplog.text
    assert not os.path.exists(marker)


def load_attempts(rank, world_size, checkpoints: list, processor_dir: str):
    """On a fresh engine: manager.load of each checkpoint, verified and not; the error texts."""
    from tests.test_checkpoint import make_engine

    engine, _ = make_engine(processor_dir, seed=1)
    manager = CheckpointManager(os.path.dirname(os.path.dirname(checkpoints[0])))
    out = []
    for path in checkpoints:
        for verify in (True, False):  # False: only weights-only loading inside DeepSpeed stands in the way
            try:
                manager.load(engine, path, verify=verify)
                out.append(f"{path} verify={verify}: LOADED")
            except Exception as e:  # noqa: BLE001 -- the message is what the test checks
                out.append(f"{type(e).__name__}: {e}")
    return out


@pytest.mark.slow
def test_planted_pickle_never_runs_through_resume(ds_run, tmp_path, tiny_processor_dir):
    paths, planted, markers = [], [], []
    for mode in MODES:
        run = str(tmp_path / mode)
        shutil.copytree(ds_run, run)
        markers.append(str(tmp_path / f"MARKER-{mode}"))
        planted.append(plant(step(run, 2), markers[-1], mode))
        paths.append(step(run, 2))
    errors = run_on_ranks(load_attempts, world_size=1, timeout=180, checkpoints=paths,
                          processor_dir=tiny_processor_dir)[0]
    for i, (path, file) in enumerate(zip(paths, planted)):
        verified, unverified = errors[2 * i], errors[2 * i + 1]
        assert verified.startswith("CheckpointError") and file in verified, verified
        assert unverified.startswith("CheckpointError") and "weights-only" in unverified, unverified
    assert not any(os.path.exists(m) for m in markers)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_planted_pickle_never_runs_through_export(run_copy, tmp_path, mode, capsys, monkeypatch):
    from ilvr.export import consolidated_state_dict, main

    marker = str(tmp_path / "MARKER")
    planted = plant(step(run_copy, 2), marker, mode)
    out = str(tmp_path / "export")
    for source in (step(run_copy, 2), run_copy):  # a checkpoint, and a run dir (its latest): no silent fallback
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", source, "--out", out])
        assert e.value.code == 2 and planted in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(marker)
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda *a, **k: None)  # the second line of defence alone
    with pytest.raises(CheckpointError, match="weights-only"):
        consolidated_state_dict(step(run_copy, 2))
    assert not os.path.exists(marker)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_planted_pickle_never_runs_through_the_evaluation_loader(run_copy, tmp_path, mode):
    from ilvr.evaluation.loading import load_eval_model

    marker = str(tmp_path / "MARKER")
    planted = plant(step(run_copy, 2), marker, mode)
    for source in (step(run_copy, 2), run_copy):  # what ilvr-eval run --model and sweep tasks load
        with pytest.raises(CheckpointError) as e:
            load_eval_model(source, device="cpu")
        assert planted in str(e.value)
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_untouched_checkpoints_still_export_and_load_for_evaluation(run_copy, tmp_path):
    """The allow-list covers what DeepSpeed writes: a clean checkpoint consolidates weights-only."""
    from ilvr.evaluation.loading import load_eval_model

    em = load_eval_model(step(run_copy, 2), device="cpu")
    assert em.step == 2 and em.latent_size == K


@pytest.mark.slow
def test_truncated_teacher_in_the_newest_checkpoint_falls_back(run_copy, caplog):
    bad = os.path.join(step(run_copy, 2), TEACHER)
    truncate(bad)
    with caplog.at_level(logging.WARNING, logger="ilvr.training.checkpoint"):
        assert resolve_resume("auto", run_copy) == step(run_copy, 1)
    assert bad in caplog.text and "sha256" in caplog.text
    with pytest.raises(CheckpointError, match=bad):
        resolve_resume(step(run_copy, 2), run_copy)
    with open(os.path.join(step(run_copy, 2), COMPLETE), "w") as f:  # an older version's marker: no hashes
        f.write("ok\n")
    with pytest.raises(CheckpointError, match="unreadable safetensors") as e:
        verify_checkpoint(step(run_copy, 2))
    assert bad in str(e.value)


# ----------------------------------------------------------------------------- fast: stand-in engine


def test_complete_records_a_hash_per_file_and_changes_are_caught(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path), keep_last=0)
    for n in (1, 2):
        manager.save(FakeEngine(n), n, {"epoch": 0}, {"loader": n})
    two = step(str(tmp_path), 2)
    recorded = json.loads(open(os.path.join(two, COMPLETE)).read())["sha256"]
    assert sorted(recorded) == [os.path.join("ds", "state.json"), "rank0.json", "trainer.json"]
    verify_checkpoint(two)

    with open(os.path.join(two, "ds", "state.json"), "a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match="ds/state.json: sha256"):
        resolve_resume(two, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ilvr.training.checkpoint"):
        assert resolve_resume("auto", str(tmp_path)) == step(str(tmp_path), 1)
    assert "skipping" in caplog.text and "ds/state.json" in caplog.text
    with pytest.raises(CheckpointError, match="state.json"):  # load verifies too
        manager.load(FakeEngine(), two)

    one = step(str(tmp_path), 1)
    open(os.path.join(one, "ds", "extra.pt"), "w").close()  # a file the save did not write
    with pytest.raises(CheckpointError, match="extra.pt: not recorded"):
        verify_checkpoint(one)
    with pytest.raises(CheckpointError, match="--resume never"):  # none verifies: never a silent restart
        resolve_resume("auto", str(tmp_path))


def test_checkpoints_without_hashes_are_accepted_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(str(tmp_path))
    path = manager.save(FakeEngine(3.0), 1)
    with open(os.path.join(path, COMPLETE), "w") as f:
        f.write("ok\n")
    with caplog.at_level(logging.WARNING, logger="ilvr.training.checkpoint"):
        assert resolve_resume("auto", str(tmp_path)) == path
    assert "before per-file hashes" in caplog.text
    engine = FakeEngine()
    manager.load(engine, path)
    assert engine.value == 3.0
    for garbled in (b"\xff\xfe", b"{\"format\": 2, \"sha256\": {\"../../etc/passwd\": \"00\"}}", b"[]"):
        with open(os.path.join(path, COMPLETE), "wb") as f:
            f.write(garbled)
        with pytest.raises(CheckpointError, match=COMPLETE):
            verify_checkpoint(path)


def test_weights_only_loading_is_forced_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = str(tmp_path / "MARKER"), str(tmp_path / "x.pt")
    torch.save({"a": Planted(marker)}, path)
    with weights_only_loading():  # first use imports DeepSpeed modules, whose imports register types of their own
        pass
    allowed_before = set(torch.serialization.get_safe_globals())
    with weights_only_loading():
        with pytest.raises(Exception, match="io.open"):
            torch.load(path, weights_only=False)  # what DeepSpeed passes
    assert not os.path.exists(marker)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert set(torch.serialization.get_safe_globals()) == allowed_before


@pytest.mark.parametrize("pointer", ["invalid-utf8", "directory", "outside", "symlinked-step"])
def test_a_bad_latest_pointer_is_ignored(tmp_path, pointer, caplog):
    manager = CheckpointManager(str(tmp_path / "run"), keep_last=0)
    for n in (1, 2):
        manager.save(FakeEngine(n), n)
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").unlink()
    if pointer == "invalid-utf8":
        (root / "latest").write_bytes(b"step-1\xff\xfe\n")
    elif pointer == "directory":
        (root / "latest").mkdir()
    elif pointer == "outside":
        (root / "latest").write_text("../../elsewhere/step-9\n")
    else:  # step-9 is a symlink to a complete checkpoint elsewhere
        shutil.copytree(root / "step-1", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", root / "step-9")
        (root / "latest").write_text("step-9\n")
    with caplog.at_level(logging.WARNING, logger="ilvr.training.checkpoint"):
        assert latest(str(tmp_path / "run")) == str(root / "step-2")
        assert resolve_resume("auto", str(tmp_path / "run")) == str(root / "step-2")
    assert "latest" in caplog.text
    manager.save(FakeEngine(3), 3)  # and the next save replaces the bad pointer
    assert latest(str(tmp_path / "run")) == str(root / "step-3")


def test_temporary_dirs_are_per_job_and_only_the_lock_holder_removes_others(tmp_path):
    out = str(tmp_path / "run")
    manager = CheckpointManager(out, keep_last=0)
    manager.save(FakeEngine(1), 1)
    root = os.path.join(out, "checkpoints")
    other = os.path.join(root, "step-2.tmp-otherhost-12345")  # another job's save in progress
    os.makedirs(os.path.join(other, "ds"))
    with pytest.raises(KeyboardInterrupt):
        CrashingManager(out, keep_last=0).save(FakeEngine(2), 2)
    mine = [n for n in os.listdir(root) if n.startswith("step-2.tmp-") and not n.endswith("-12345")]
    assert len(mine) == 1 and mine[0].endswith(f"-{os.getpid()}")
    manager.save(FakeEngine(2), 2)
    assert os.path.isdir(other)  # never removed by a job that does not hold the output dir's lock
    lock_output_dir(out)
    manager.save(FakeEngine(3), 3)
    assert not os.path.exists(other)  # the lock holder knows no other job writes here
    assert sorted(os.listdir(root)) == ["latest", "step-1", "step-2", "step-3"]


# ----------------------------------------------------------------------------- one job per output dir


@pytest.fixture
def lock_holder(tmp_path):
    """A separate process holding <tmp>/run/.lock, as a running job does; killed at the end."""
    out = str(tmp_path / "run")
    code = ("import sys, time; from ilvr.training.run_lock import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_naming_the_holder(lock_holder):
    out, holder = lock_holder
    with pytest.raises(OutputDirBusy) as e:
        lock_output_dir(out)
    assert f"pid {holder.pid}" in str(e.value) and "train.output_dir" in str(e.value)
    recorded = json.loads(open(os.path.join(out, ".lock")).read())
    assert recorded["pid"] == holder.pid and recorded["host"] and recorded["started"]
    holder.kill()
    holder.wait()
    lock_output_dir(out)  # released by the OS when its holder died
    assert json.loads(open(os.path.join(out, ".lock")).read())["pid"] == os.getpid()


def claim(rank, world_size, out_dir: str):
    started = time.monotonic()
    try:
        run_lock.claim_output_dir(out_dir)
    except OutputDirBusy as e:
        return {"refused": str(e), "seconds": time.monotonic() - started}
    return {"refused": None}


def test_every_rank_learns_the_refusal_at_once(lock_holder):
    out, holder = lock_holder
    results = run_on_ranks(claim, world_size=2, timeout=60, out_dir=out)
    for r in results:  # rank 1 did not try the lock itself: it got rank 0's answer
        assert r["refused"] and f"pid {holder.pid}" in r["refused"] and r["seconds"] < 10


@pytest.mark.slow
def test_a_second_training_job_exits_within_seconds_and_writes_nothing(lock_holder, tiny_processor_dir, tmp_path):
    from tests.test_train import command, env

    out, holder = lock_holder
    make_shards(str(tmp_path / "shards"))
    before = sorted(os.listdir(out))
    started = time.monotonic()
    cmd = command(out, str(tmp_path / "shards"), tiny_processor_dir, "train.stage=1", "train.max_steps=2")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    refusal = f"ilvr-train: train.output_dir={out!r} is in use by another job (pid {holder.pid}"
    assert text.count(refusal) == 2, text[-3000:]  # both ranks, neither waiting for the other
    assert sorted(os.listdir(out)) == before == [".lock"]  # no checkpoint, metrics, config or MLflow store
    assert elapsed < 60, elapsed  # startup (imports, process group) only: no model, no engine (~7 s here)


# ----------------------------------------------------------------------------- the trainer end to end


@pytest.mark.slow
def test_trainer_resume_auto_skips_damaged_and_planted_checkpoints(tmp_path, tiny_processor_dir):
    from tests.test_train import command, env, metrics

    shard_dir = str(tmp_path / "shards")
    make_shards(shard_dir)
    out = str(tmp_path / "run")

    def train(*overrides, resume="auto"):
        cmd = command(out, shard_dir, tiny_processor_dir, "train.stage=1", "train.save_every=1",
                      "train.keep_last=5", *overrides) + ["--resume", resume]
        return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)

    first = train("train.max_steps=3")
    assert first.returncode == 0, first.stderr[-4000:]
    teacher = os.path.join(step(out, 3), "teacher", "teacher_rank1.safetensors")
    truncate(teacher, 100)
    marker = str(tmp_path / "MARKER")
    planted = plant(step(out, 2), marker, "rehashed")

    explicit = train("train.max_steps=4", resume=step(out, 2))
    assert explicit.returncode != 0 and planted in explicit.stderr and "weights-only" in explicit.stderr
    resumed = train("train.max_steps=4")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert f"skipping {step(out, 3)}" in log and teacher in log
    assert f"skipping {step(out, 2)}" in log and planted in log
    assert f"resumed from {step(out, 1)}" in log
    assert sorted(metrics(out)) == [1, 2, 3, 4]
    assert not os.path.exists(marker)


def make_shards(out: str) -> None:
    from data_pipeline.records import record_to_sample
    from data_pipeline.shards import ShardWriter
    from data_pipeline.sources.synthetic_vsp import read as synthetic

    writer = ShardWriter(out, prefix="train", samples_per_shard=8)
    for i, rec in enumerate(synthetic(num_samples=48, seed=7, min_size=3, max_size=4)):
        writer.write(record_to_sample(rec, i))
    writer.close()


# ----------------------------------------------------------------------------- ilvr-export --out


@pytest.fixture
def fake_checkpoint(tmp_path) -> str:
    return CheckpointManager(str(tmp_path / "run")).save(FakeEngine(), 1, {"config": {"model": {"latent_size": K}}})


def export_refusal(capsys, *argv) -> str:
    from ilvr.export import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_export_never_replaces_the_current_dir_its_parents_home_or_root(fake_checkpoint, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("precious")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    for out in (".", "..", str(tmp_path / "work"), "/", str(cwd)):
        err = export_refusal(capsys, "--checkpoint", fake_checkpoint, "--out", out, "--overwrite")
        assert "never replaced" in err
    assert (cwd / "notes.txt").read_text() == "precious"


def test_export_overwrite_only_replaces_an_earlier_export(fake_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    err = export_refusal(capsys, "--checkpoint", fake_checkpoint, "--out", str(other), "--overwrite")
    assert "only replaces an earlier export" in err and (other / "data.csv").exists()
    err = export_refusal(capsys, "--checkpoint", fake_checkpoint, "--out", str(other))
    assert "pass --overwrite" in err
    for inside in (os.path.dirname(fake_checkpoint), os.path.join(fake_checkpoint, "export")):
        err = export_refusal(capsys, "--checkpoint", fake_checkpoint, "--out", inside, "--overwrite")
        assert "which the export reads" in err
    assert os.listdir(fake_checkpoint)
    os.symlink(other, tmp_path / "link")
    assert "symbolic link" in export_refusal(capsys, "--checkpoint", fake_checkpoint, "--out",
                                             str(tmp_path / "link"), "--overwrite")


def test_swap_in_replaces_whole_directories_only(tmp_path, monkeypatch):
    from ilvr.export import swap_in

    out, new = tmp_path / "export", tmp_path / "new"
    out.mkdir()
    (out / "ilvr_settings.json").write_text("old")
    new.mkdir()
    (new / "ilvr_settings.json").write_text("new")
    swap_in(str(new), str(out))
    assert (out / "ilvr_settings.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["export"]

    new.mkdir()
    real_replace = os.replace

    def failing(src, dst):
        if src == str(new):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        swap_in(str(new), str(out))
    assert (out / "ilvr_settings.json").read_text() == "new"  # the old export is put back


def test_a_damaged_teacher_file_is_an_error_naming_it(tmp_path):
    """Resume catches it by its hash first; a direct teacher load still names the file."""
    from safetensors.torch import save_file

    from ilvr.training.teacher import FILE_PATTERN, MomentumTeacher

    teacher = MomentumTeacher.__new__(MomentumTeacher)  # only the buffers matter to load()
    teacher._buffers = {"w": torch.zeros(64)}
    path = str(tmp_path / FILE_PATTERN.format(rank=0))
    save_file({"w": torch.ones(64)}, path)
    truncate(path, 100)
    with pytest.raises(CheckpointError, match=path):
        teacher.load(str(tmp_path), 0)
