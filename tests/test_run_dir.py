"""A training start into a used output dir: continued only with a compatible recorded config, a finished run
says so, anything else is refused naming the fields and the ways out; the record is never rewritten with
values the run was not trained with. train.epochs resolved to steps as the loader counts them.
The last test drives `ilvr/train.py` on 2 ranks through all of it (and checks train.log)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time

import pytest
import yaml

from data_pipeline.records import record_to_sample
from data_pipeline.shards import ShardWriter, expand_shards, shard_sample_counts
from data_pipeline.sources.synthetic_vsp import read as synthetic
from ilvr.config import Config
from ilvr.training.run_dir import RunDirRefused, config_changes, is_allowed, plan_run
from ilvr.training.schedule import resolve_epochs
from tests.test_train import command, env, metrics


def make_cfg(out, **train) -> Config:
    cfg = Config()
    cfg.train.output_dir = str(out)
    cfg.train.lr = 1e-3
    cfg.train.max_steps = 30
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def fake_run(out, step: int, cfg: Config) -> str:
    """A run dir with one complete checkpoint at `step` recording `cfg` (what plan_run reads)."""
    ckpt = out / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"format": 2, "sha256": {}}))
    (ckpt / "trainer.json").write_text(json.dumps({"step": step, "config": cfg.to_dict()}))
    (out / "checkpoints" / "latest").write_text(f"step-{step}")
    cfg.save(str(out / "config.resolved.yaml"))
    return str(ckpt)


def test_a_new_dir_starts_a_run(tmp_path):
    plan = plan_run(make_cfg(tmp_path / "run"), "auto")
    assert (plan.action, plan.record_config, plan.changes) == ("new", True, {})


def test_a_finished_run_says_so_unless_max_steps_grew(tmp_path):
    out = tmp_path / "run"
    fake_run(out, 30, make_cfg(out))
    with pytest.raises(RunDirRefused, match=r"is finished: .* at step 30 and train.max_steps=30.*raise train.max_steps"):
        plan_run(make_cfg(out), "auto")
    plan = plan_run(make_cfg(out, max_steps=40), "auto")
    assert (plan.action, plan.step, plan.changes) == ("resume", 30, {"train.max_steps": [30, 40]})
    assert plan.accepted_by == "allowed" and plan.record_config  # an allowed change: the record follows it


def test_a_changed_lr_is_refused_with_the_field_and_both_ways_out(tmp_path):
    out = tmp_path / "run"
    fake_run(out, 30, make_cfg(out))
    with pytest.raises(RunDirRefused) as e:
        plan_run(make_cfg(out, lr=5e-4), "auto")
    message = str(e.value)
    assert "train.lr: 0.001 (recorded) -> 0.0005 (given)" in message and "the run is finished" in message
    assert "--resume never with a new train.output_dir" in message and "--allow-config-change" in message
    with pytest.raises(RunDirRefused, match="is finished"):  # consent to the change does not make it unfinished
        plan_run(make_cfg(out, lr=5e-4), "auto", allow_config_change=True)
    plan = plan_run(make_cfg(out, lr=5e-4, max_steps=40), "auto", allow_config_change=True)
    assert plan.accepted_by == "--allow-config-change" and plan.changes["train.lr"] == [1e-3, 5e-4]
    assert not plan.record_config  # config.resolved.yaml keeps lr 1e-3, the lr the weights were trained with


def test_an_unfinished_run_takes_allowed_changes_and_refuses_a_changed_recipe(tmp_path):
    out = tmp_path / "run"
    fake_run(out, 10, make_cfg(out))
    cfg = make_cfg(out, log_every=5, stop_after=3, collective_timeout=60, save_every=5, keep_last=4)
    cfg.data.num_workers, cfg.eval.batch_size = 0, 2
    plan = plan_run(cfg, "auto")
    assert plan.action == "resume" and plan.accepted_by == "allowed" and len(plan.changes) == 7
    changed = make_cfg(out)
    changed.loss.temperature = 0.5
    changed.train.stage1_steps = 20  # the run is in stage 2 (stage1_steps 0): this would send it back to stage 1
    with pytest.raises(RunDirRefused) as e:
        plan_run(changed, "auto")
    assert "loss.temperature: 0.1 (recorded) -> 0.5 (given)" in str(e.value)
    assert "train.stage1_steps: 0 (recorded) -> 20 (given)" in str(e.value)


def test_an_explicit_checkpoint_is_consent_and_never_mixes_into_a_used_dir(tmp_path):
    out = tmp_path / "run"
    ckpt = fake_run(out, 10, make_cfg(out))
    plan = plan_run(make_cfg(out, lr=5e-4), ckpt)
    assert plan.accepted_by == f"--resume {ckpt}" and plan.checkpoint == ckpt and not plan.record_config
    other = plan_run(make_cfg(tmp_path / "fork", lr=5e-4), ckpt)  # a new dir continuing from it: its own record
    assert other.record_config and other.changes["train.lr"] == [1e-3, 5e-4]
    with pytest.raises(RunDirRefused, match=r"already holds a run .*--resume never would start a second run"):
        plan_run(make_cfg(out), "never")
    with pytest.raises(RunDirRefused, match="not a complete checkpoint"):
        plan_run(make_cfg(out), str(tmp_path / "nowhere"))


def test_changes_compare_values_not_spellings(tmp_path):
    old = make_cfg(tmp_path).to_dict()
    del old["train"]["epochs"]  # a record written before the field existed: its default
    new = make_cfg(tmp_path).to_dict()
    new["train"]["betas"] = list(new["train"]["betas"])  # YAML gives lists back
    new["train"]["max_bad_steps"] = float(new["train"]["max_bad_steps"])
    assert config_changes(old, new) == {}
    assert is_allowed("eval.max_new_tokens") and is_allowed("train.max_steps") and not is_allowed("train.lr")


def write_shards(out: str, n: int, per_shard: int = 8) -> str:
    writer = ShardWriter(out, prefix="train", samples_per_shard=per_shard)
    for i, rec in enumerate(synthetic(num_samples=n, seed=7, min_size=3, max_size=4)):
        writer.write(record_to_sample(rec, i))
    writer.close()
    return out


@pytest.mark.parametrize("world,batch,accum,workers", [(2, 2, 1, 0), (3, 2, 2, 2), (1, 4, 3, 1)])
def test_epochs_resolve_to_the_steps_the_loader_takes(tmp_path, world, batch, accum, workers):
    from data_pipeline.loader import build_loader

    shards = write_shards(str(tmp_path / "shards"), 50)
    cfg = make_cfg(tmp_path / "run", max_steps=0, epochs=2.5, stage="1+2", stage1_epochs=1.0, grad_accum=accum)
    cfg.data.train_shards, cfg.data.batch_size, cfg.data.num_workers = shards, batch, workers
    note = resolve_epochs(cfg, world)
    urls = expand_shards(shards)
    per_epoch = build_loader(urls, shard_sample_counts(urls), None, None, rank=0, world_size=world,
                             batch_size=batch, num_workers=workers).batches_per_epoch / accum
    assert cfg.train.max_steps == math.ceil(2.5 * per_epoch - 1e-9)
    assert cfg.train.stage1_steps == math.ceil(per_epoch - 1e-9)
    assert (cfg.train.epochs, cfg.train.stage1_epochs) == (0.0, 0.0)  # the record counts steps
    assert f"train.epochs=2.5 -> train.max_steps={cfg.train.max_steps}" in note and "50 samples" in note
    assert f"{world * batch * accum} samples per step" in note


def test_epochs_on_another_world_size_count_the_rest_in_its_steps(tmp_path):
    shards = write_shards(str(tmp_path / "shards"), 48)

    def cfg(max_steps=0, stage1_steps=0, epochs=3.0, stage1_epochs=2.0):
        c = make_cfg(tmp_path / "run", max_steps=max_steps, stage1_steps=stage1_steps, epochs=epochs,
                     stage="1+2", stage1_epochs=stage1_epochs)
        c.data.train_shards, c.data.batch_size, c.data.num_workers = shards, 2, 0
        return c

    first = cfg()
    resolve_epochs(first, 2)  # 48 / (2 x 2) = 12 steps per epoch
    assert (first.train.max_steps, first.train.stage1_steps) == (36, 24)
    fake_run(tmp_path / "run", 12, first)  # one epoch done on 2 ranks
    again = cfg()
    note = resolve_epochs(again, 4, resumed=(12, 2))  # 6 steps per epoch on 4 ranks: 2 and 1 epochs to go
    assert (again.train.max_steps, again.train.stage1_steps) == (12 + 12, 12 + 6)
    assert "resumed at step 12 of a run on 2 ranks" in note
    plan = plan_run(again, "auto")  # both boundaries still ahead: the new lengths are taken
    assert plan.changes == {"train.max_steps": [36, 24], "train.stage1_steps": [24, 18]}
    # a boundary moved behind the checkpoint (step 12): stage 1 would end at once, not after its share
    late = cfg(epochs=0.0, stage1_epochs=0.0, max_steps=36, stage1_steps=10)
    with pytest.raises(RunDirRefused, match=r"train.stage1_steps: 24 \(recorded\) -> 10"):
        plan_run(late, "auto")


def run_train(out: str, shards: str, processor: str, *args: str) -> subprocess.CompletedProcess:
    # ZeRO-2: what a run dir records does not depend on the stage, and this also shows that ilvr/train.py trains
    # both stages under ZeRO-2 (every other end-to-end run of this size uses ZeRO-3)
    return subprocess.run(command(out, shards, processor, *args, ds="zero2"), env=env(), capture_output=True,
                          text=True, timeout=400)


@pytest.mark.slow
def test_rerunning_into_a_run_dir(tmp_path, tiny_processor_dir):
    shards = write_shards(str(tmp_path / "shards"), 48)
    out = str(tmp_path / "run")
    # 48 samples / (2 ranks x batch 2) = 12 steps per epoch: 0.25 epoch = 3 steps, stage 1 = 2 of them
    first = run_train(out, shards, tiny_processor_dir, "train.max_steps=0", "train.stage1_steps=0",
                      "train.epochs=0.25", "train.stage1_epochs=0.125", "train.save_every=0")
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(metrics(out)) == [1, 2, 3]  # ZeRO-2 trains (stage 1 for 2 steps, then stage 2)
    assert [metrics(out)[s]["stage"] for s in (1, 2, 3)] == [1.0, 1.0, 2.0]
    assert json.load(open(os.path.join(out, "ds_config.resolved.json")))["zero_optimization"]["stage"] == 2
    resolved = os.path.join(out, "config.resolved.yaml")
    recorded = yaml.safe_load(open(resolved))
    assert (recorded["train"]["max_steps"], recorded["train"]["stage1_steps"], recorded["train"]["epochs"]) == (3, 2, 0)
    assert open(resolved).readline().startswith("# train.epochs=0.25 -> train.max_steps=3")
    log_text = open(os.path.join(out, "train.log")).read()
    assert "train.epochs=0.25 -> train.max_steps=3" in log_text
    assert "step 3/3 (100%, eta 0s," in log_text and "samples/s)" in log_text
    before = {name: open(os.path.join(out, name)).read() for name in ("config.resolved.yaml", "ds_config.resolved.json")}

    same = ("train.max_steps=3", "train.stage1_steps=2", "train.save_every=0")
    t0 = time.time()
    finished = run_train(out, shards, tiny_processor_dir, *same)
    assert finished.returncode != 0 and "ilvr-train: the run in" in finished.stderr, finished.stderr[-3000:]
    # the ranks' own refusal: exit status 3 (torchrun: "exitcode  : 3"; tests/warm_launch.py: "exited with 3")
    assert "is finished" in finished.stderr and re.search(r"exitcode\s+: 3|rank \d exited with 3", finished.stderr)
    changed = run_train(out, shards, tiny_processor_dir, *same, "train.lr=5e-4")
    assert changed.returncode != 0 and time.time() - t0 < 150, changed.stderr[-3000:]  # seconds, not a hang
    assert "train.lr: 0.001 (recorded) -> 0.0005 (given)" in changed.stderr and "--allow-config-change" in changed.stderr
    for name, text in before.items():  # nothing was rewritten by the refused starts
        assert open(os.path.join(out, name)).read() == text, name
    assert sorted(metrics(out)) == [1, 2, 3] and os.path.isfile(os.path.join(out, "finished.json"))

    longer = run_train(out, shards, tiny_processor_dir, "train.max_steps=4", "train.stage1_steps=2",
                       "train.save_every=0", "train.log_every=2")  # max_steps grew, log_every may change
    assert longer.returncode == 0, longer.stderr[-4000:]
    assert sorted(metrics(out)) == [1, 2, 3, 4]
    assert yaml.safe_load(open(resolved))["train"]["max_steps"] == 4  # allowed changes are recorded
    with open(os.path.join(out, "config.history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [h["action"] for h in history] == ["new", "resume"]
    assert history[1]["changes"]["train.max_steps"] == [3, 4] and history[1]["step"] == 3
    assert json.load(open(os.path.join(out, "finished.json")))["step"] == 4


def test_train_log_has_rank_0s_lines_and_every_ranks_errors(tmp_path):
    import logging

    from ilvr.training.distributed import DistInfo, add_log_file, format_duration

    path = str(tmp_path / "train.log")
    root = logging.getLogger()
    log = logging.getLogger("ilvr.training.trainer")

    def remove():
        for handler in [h for h in root.handlers if h.get_name() == "ilvr-run-log"]:
            root.removeHandler(handler)
            handler.close()

    try:  # another rank: nothing but errors, and no file until there is one
        add_log_file(DistInfo(1, 2, 1), path)
        log.warning("step 1/2")
        assert not os.path.exists(path)
        try:
            raise AttributeError("no attribute '_kernel_funcs'")
        except AttributeError:
            log.exception("training failed")
    finally:
        remove()
    try:
        add_log_file(DistInfo(0, 2, 0), path)
        add_log_file(DistInfo(0, 2, 0), path)  # a second Trainer in one process: replaced, not doubled
        log.warning("step 1/2 (50%%, eta %s)", format_duration(3725))
    finally:
        remove()
    text = open(path).read()
    assert "[rank 1] ERROR ilvr.training.trainer: training failed\nTraceback (most recent call last)" in text
    assert text.count("AttributeError: no attribute '_kernel_funcs'") == 1 and "[rank 1] WARNING" not in text
    assert text.count("[rank 0] WARNING ilvr.training.trainer: step 1/2 (50%, eta 1h02m)") == 1
    assert (format_duration(185), format_duration(12.4), format_duration(-1)) == ("3m05s", "12s", "0s")


def test_deepspeed_auto_and_allow_config_change_reach_the_trainer(monkeypatch, tmp_path):
    import ilvr.training.trainer as trainer_module
    from ilvr.train import AUTO_DS_CONFIG, main
    from tests.conftest import REPO

    seen = {}

    class FakeTrainer:
        def __init__(self, cfg, ds_config, resume="auto", allow_config_change=False, evaluation=None):
            seen.update(ds_config=ds_config, resume=resume, allow=allow_config_change, evaluation=evaluation)

        def run(self):
            return {}

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    args = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "data.train_shards=", "data.eval_shards=",
            "data.processor=", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["--deepspeed", "auto", "--allow-config-change", *args]) == 0
    from ilvr.evaluation.periodic import PeriodicEval

    assert seen == {"ds_config": AUTO_DS_CONFIG, "resume": "auto", "allow": True, "evaluation": PeriodicEval}
    assert AUTO_DS_CONFIG == str(REPO / "ds_configs" / "zero3.json")
    assert main(args) == 0 and seen["ds_config"] == AUTO_DS_CONFIG and not seen["allow"]  # auto is the default
