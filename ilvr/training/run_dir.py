"""What a training start does with its output dir: start a run, continue it, or refuse.

    plan = plan_run(cfg, resume="auto", allow_config_change=False)   # RunDirRefused with the reason and the fix

As with the HF Trainer and LLaMA-Factory, a directory that holds a run is only continued when
the config given now is the one the run was trained with, give or take fields that may change
on resume (ALLOWED_ON_RESUME: the length, logging, checkpointing, timeouts, loader workers,
evaluation). Anything else is refused naming each differing field (recorded -> given) and the
two ways out: `--resume never` with a new `train.output_dir`, or `--allow-config-change`. An
explicit `--resume PATH` is such a consent too. A run at or past `train.max_steps` is finished:
it says so and trains nothing, unless max_steps grew. `--resume never` into a dir that holds a
checkpoint is refused (two runs' checkpoints and metrics would mix).

The record: `config.resolved.yaml` is written for a new run, or on resume with allowed changes
only; a run continued with other changes keeps the config it started with, and every start
(what changed, from which step, who allowed it) is appended to `config.history.jsonl`.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from ilvr.config import Config, upgrade_legacy_keys
from ilvr.training.checkpoint_verify import read_trainer_state

log = logging.getLogger(__name__)

RESOLVED_FILE = "config.resolved.yaml"
DS_RESOLVED_FILE = "ds_config.resolved.json"
HISTORY_FILE = "config.history.jsonl"
FINISHED_FILE = "finished.json"  # written when a run reaches train.max_steps (slurm/train.sh reads it)
# fields that may differ between the recorded config and the one given on resume: they change how long the
# run goes, what it logs and saves, how it waits and loads, not what a step computes
ALLOWED_ON_RESUME = (
    "train.max_steps", "train.epochs", "train.log_every", "train.save_every", "train.keep_last",
    "train.stop_after", "train.collective_timeout", "train.max_bad_steps", "train.comm_stats",
    "train.gather_once", "train.health_*", "train.eval_every", "train.keep_best*", "train.output_dir",
    "data.num_workers", "data.eval_shards", "data.max_skip_fraction",
    "model.gradient_checkpointing", "eval.*",
)  # and train.stage1_steps while the run is still in stage 1 (_same_stage)
_PATH_FIELDS = ("data.train_shards", "data.processor", "model.name_or_path")


class RunDirRefused(RuntimeError):
    """This start would misrecord or mix runs; the message names the differences and the ways out."""


@dataclass
class RunPlan:
    """The decision, the same on every rank (rank 0 makes it; the others receive it)."""

    action: str  # "new" (nothing to resume) | "resume"
    checkpoint: "str | None" = None  # the checkpoint the run continues from
    step: int = 0  # its step
    changes: dict[str, list] = field(default_factory=dict)  # field -> [recorded, given]
    accepted_by: str = ""  # "" (no change) | "allowed" | "--allow-config-change" | "--resume PATH"
    record_config: bool = True  # write config.resolved.yaml / ds_config.resolved.json

    def describe(self) -> str:
        if self.action == "new":
            return "a new run" + (f" (the last attempt here left no checkpoint; {self._changed()})"
                                  if self.changes else "")
        how = f", accepted by {self.accepted_by}" if self.accepted_by not in ("", "allowed") else ""
        return f"resuming {self.checkpoint} at step {self.step}" + (f" ({self._changed()}{how})"
                                                                    if self.changes else "")

    def _changed(self) -> str:
        return "changed: " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(self.changes.items()))


def is_allowed(name: str) -> bool:
    """Whether `section.key` may change on resume."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in ALLOWED_ON_RESUME)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as YAML and JSON give them back


def _same(name: str, old: Any, new: Any) -> bool:
    if name in _PATH_FIELDS and isinstance(old, str) and isinstance(new, str) and old and new and "://" not in new:
        return os.path.realpath(old) == os.path.realpath(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def config_changes(recorded: dict, given: dict) -> dict[str, list]:
    """`section.key` -> [recorded, given] for every field that differs; a field the record lacks (added
    since) counts as its default."""
    defaults, given = _plain(Config().to_dict()), _plain(given)
    recorded = upgrade_legacy_keys(_plain(recorded or {}), recorded=True)
    changes = {}
    for section, values in given.items():
        old_section = recorded.get(section) if isinstance(recorded.get(section), dict) else {}
        for key, new in values.items():
            old = old_section.get(key, defaults.get(section, {}).get(key))
            if not _same(f"{section}.{key}", old, new):
                changes[f"{section}.{key}"] = [old, new]
    return changes


def recorded_config(checkpoint: "str | None", output_dir: str) -> "dict | None":
    """The config a checkpoint was trained with: its trainer.json, else its run's config.resolved.yaml
    (checkpoint None: the output dir's config.resolved.yaml, left by an attempt that never saved)."""
    config = read_trainer_state(checkpoint).get("config") if checkpoint else None
    if isinstance(config, dict):
        return config
    for directory in ([os.path.dirname(os.path.dirname(checkpoint))] if checkpoint else []) + [output_dir]:
        path = os.path.join(directory, RESOLVED_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
            if isinstance(loaded, dict):
                return loaded
        except (OSError, yaml.YAMLError):
            continue
    return None


def _explicit_checkpoint(path: str) -> str:
    """The checkpoint `--resume PATH` names: the dir itself, or a run dir's latest."""
    from ilvr.training.checkpoint import latest
    from ilvr.training.checkpoint_verify import is_complete

    found = path if is_complete(path) else latest(path) if os.path.isdir(os.path.join(path, "checkpoints")) else None
    if found is None:
        raise RunDirRefused(f"--resume {path}: not a complete checkpoint (a step-<N> dir with COMPLETE) nor a run "
                            "directory with one; use --resume auto, --resume never, or such a path")
    return found


def plan_run(cfg: Config, resume: "str | None", allow_config_change: bool = False) -> RunPlan:
    """Decide from the files what this start does (see the module doc); RunDirRefused when it must not."""
    from ilvr.training.checkpoint import latest, no_healthy_checkpoint, unhealthy

    out = cfg.train.output_dir
    given = cfg.to_dict()
    if resume in (None, "", "never"):
        found = latest(out, include_unhealthy=True)
        if found:
            raise RunDirRefused(
                f"train.output_dir={out} already holds a run (checkpoint {found}); --resume never would start a "
                "second run in it and mix their checkpoints, metrics and MLflow runs. Give a new "
                "train.output_dir for a new run, or use --resume auto to continue this one")
        return RunPlan("new")
    explicit = resume != "auto"
    checkpoint = _explicit_checkpoint(resume) if explicit else latest(out)
    if checkpoint is None and unhealthy(out):  # checkpoints, none fit to go on from: never a silent restart
        raise RunDirRefused(no_healthy_checkpoint(out, unhealthy(out)))
    if checkpoint is None:  # nothing trained here yet (a fresh dir, or an attempt that never saved)
        previous = recorded_config(None, out)
        return RunPlan("new", changes=config_changes(previous, given) if previous else {})
    state = read_trainer_state(checkpoint)
    step = int(state.get("step", 0)) if isinstance(state.get("step", 0), int) else 0
    recorded = recorded_config(checkpoint, out)
    changes = config_changes(recorded, given) if recorded is not None else {}
    blocked = {k: v for k, v in changes.items() if not is_allowed(k) and not _same_stage(k, v, step)}
    if blocked and not (explicit or allow_config_change):
        raise RunDirRefused(_incompatible(out, checkpoint, step, cfg, blocked))
    if step >= cfg.train.max_steps:
        raise RunDirRefused(_finished(out, checkpoint, step, cfg))
    accepted_by = ("--allow-config-change" if allow_config_change else f"--resume {resume}") if blocked else \
        ("allowed" if changes else "")
    # the record is rewritten only with values the run may take on (a dir without one gets one: resumed from elsewhere)
    own_record = os.path.isfile(os.path.join(out, RESOLVED_FILE))
    return RunPlan("resume", checkpoint, step, changes, accepted_by,
                   record_config=(not blocked and bool(changes)) or not own_record)


def _same_stage(name: str, values: list, step: int) -> bool:
    """train.stage1_steps may move while the run is before both boundaries (still in stage 1, like a longer
    max_steps) or past both (no effect): never so that a stage-2 checkpoint goes back to stage 1."""
    if name != "train.stage1_steps" or not all(isinstance(v, int) for v in values):
        return False
    return step < min(values) or step >= max(values)


def resume_point(cfg: Config, resume: "str | None") -> "tuple[int, int] | None":
    """(step, world size) of the checkpoint this start would continue from (None: a new run), read before
    anything is verified or loaded, for train.epochs on another world size."""
    from ilvr.training.checkpoint import latest

    if resume in (None, "", "never"):
        return None
    checkpoint = _explicit_checkpoint(resume) if resume != "auto" else latest(cfg.train.output_dir)
    state = read_trainer_state(checkpoint) if checkpoint else {}
    step, world = state.get("step"), state.get("world_size")
    return (step, world) if isinstance(step, int) and isinstance(world, int) else None


def _incompatible(out: str, checkpoint: str, step: int, cfg: Config, blocked: dict) -> str:
    lines = "\n".join(f"  {k}: {v[0]!r} (recorded) -> {v[1]!r} (given)" for k, v in sorted(blocked.items()))
    finished = f"; the run is finished (step {step})" if step >= cfg.train.max_steps else ""
    return (f"train.output_dir={out} holds a run (checkpoint {checkpoint}, step {step}{finished}) trained with "
            f"another config; these fields differ and cannot change on resume:\n{lines}\n"
            f"(fields that may: {', '.join(ALLOWED_ON_RESUME)}). Either start a new run: --resume never with a "
            "new train.output_dir; or continue this one with the new values anyway: --allow-config-change "
            f"(the change is recorded in {os.path.join(out, HISTORY_FILE)})")


def _finished(out: str, checkpoint: str, step: int, cfg: Config) -> str:
    marker = " (finished.json)" if os.path.isfile(os.path.join(out, FINISHED_FILE)) else ""
    return (f"the run in train.output_dir={out} is finished{marker}: its checkpoint {checkpoint} is at step {step} "
            f"and train.max_steps={cfg.train.max_steps}, so there is nothing to train. To train it longer, raise "
            "train.max_steps (or train.epochs); for a new run, use --resume never with a new train.output_dir")


def append_history(output_dir: str, plan: RunPlan, world_size: int, note: "str | None" = None) -> str:
    """One JSON line per start in <output_dir>/config.history.jsonl: what was decided and what changed."""
    path = os.path.join(output_dir, HISTORY_FILE)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(plan), "world_size": world_size,
             "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    if note:
        entry["resolved"] = note
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- the trainer's start


def agree_on_start(cfg: Config, info, resume: "str | None", allow_config_change: bool) -> "tuple[RunPlan, str | None]":
    """Resolve train.epochs and decide what this start does with its output dir (plan_run: a new run, a
    resume, or a refusal naming the differing fields); collective. Rank 0 decides from the files and every rank
    takes its answer, so a refusal ends all ranks at once, seconds after the start. Sets cfg.train's step counts,
    adds train.log; rank 0 logs the plan and appends it to config.history.jsonl. (the plan, the epochs note)"""
    from ilvr.config import ConfigError
    from ilvr.training.distributed import add_log_file, all_gather_json

    outcome = all_gather_json(_decide(cfg, info.world_size, resume, allow_config_change) if info.is_main else None)[0]
    if "error" in outcome:
        raise {"config": ConfigError, "refused": RunDirRefused}.get(outcome["kind"], RuntimeError)(outcome["error"])
    t, out = cfg.train, cfg.train.output_dir
    t.max_steps, t.stage1_steps = outcome["steps"]
    t.epochs = t.stage1_epochs = 0.0
    plan, note = RunPlan(**outcome["plan"]), outcome["note"]
    add_log_file(info, os.path.join(out, "train.log"))
    if not info.is_main:
        return plan, note
    if note:
        log.info("%s", note)
    (log.warning if plan.accepted_by.startswith("--") else log.info)("train.output_dir=%s: %s", out, plan.describe())
    append_history(out, plan, info.world_size, note)
    if os.path.exists(os.path.join(out, FINISHED_FILE)):  # it trains again (max_steps grew): no longer finished
        os.remove(os.path.join(out, FINISHED_FILE))
    return plan, note


def _decide(cfg: Config, world_size: int, resume: "str | None", allow_config_change: bool) -> dict:
    """Rank 0's part of agree_on_start, as JSON for the other ranks (an error is sent, never left to hang them)."""
    from ilvr.config import ConfigError
    from ilvr.training.schedule import resolve_epochs

    try:
        note = resolve_epochs(cfg, world_size, resume_point(cfg, resume))
        plan = plan_run(cfg, resume, allow_config_change)
    except ConfigError as e:
        return {"error": str(e), "kind": "config"}
    except RunDirRefused as e:
        return {"error": str(e), "kind": "refused"}
    except Exception as e:  # noqa: BLE001  (any failure must reach the other ranks)
        return {"error": f"deciding how to use train.output_dir failed: {type(e).__name__}: {e}", "kind": "error"}
    return {"plan": asdict(plan), "steps": [cfg.train.max_steps, cfg.train.stage1_steps], "note": note}


def record_config(cfg: Config, plan: RunPlan, note: "str | None", ds_config: dict, tracker) -> None:
    """Rank 0: config.resolved.yaml / ds_config.resolved.json, only for a new run or a resume with allowed
    changes (a run's record never takes values it was not trained with); config.history.jsonl has every start.
    The files written are logged to MLflow (`tracker`)."""
    from ilvr.training.ds_config import save_resolved

    out = cfg.train.output_dir
    written = [os.path.join(out, HISTORY_FILE)]
    if plan.record_config:
        cfg.save(os.path.join(out, RESOLVED_FILE), header=f"# {note}\n" if note else "")
        save_resolved(ds_config, os.path.join(out, DS_RESOLVED_FILE))
        written += [os.path.join(out, RESOLVED_FILE), os.path.join(out, DS_RESOLVED_FILE)]
    elif plan.changes:
        log.warning("%s and %s keep the config this run was trained with; the change is in %s", RESOLVED_FILE,
                    DS_RESOLVED_FILE, HISTORY_FILE)
    for path in written:
        tracker.log_artifact(path)
