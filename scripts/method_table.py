"""The method table: what each part of ILVR contributes, on VSP, at a size this CPU machine can train.

    bash scripts/method_table.sh [--quick] [--out runs/method]

Every variant is trained from the same starting point with the project's own `ilvr-train`
(DeepSpeed, 2 ranks, ZeRO-2: faster than ZeRO-3 at this size), on the same synthetic maps
(seed 0), for the same steps with the same seeds; each is exported and evaluated with
`ilvr-eval` on held-out synthetic maps (seed 1) and on the real 400-map VSP test set
(`../shared/data/vsp_test`, asked in the synthetic data's wording: see
data_pipeline/sources/vsp.py), all logged to one MLflow store (`<out>/mlflow.db`).

Variants (the data style is data_pipeline/sources/synthetic_vsp.STYLES):
  direct       question -> \\boxed{plan}
  cot-coords   text steps "Move R: from (0,1) to (0,2), safe ice."
  cot-moves    text steps "Move R." (the state is never written down)
  ilvr-stage1  "Move R." + a latent step, stage 1 only (teacher-forced latents)
  ilvr         "Move R." + a latent step, stage 1 then stage 2 (the method); evaluated also with
               constant-latent and shuffled-latent inputs
  ilvr-pooled  as ilvr, but stage-1 targets are the helper image's own features pooled to K
               (no momentum teacher, no selection: Mirage-style)
  ilvr-change  (not run by default) as ilvr, with `loss.change_weight`: the teacher's selection led by the
               squares that changed since the previous image. A named option beyond the method.
  ilvr-rescale (not run by default) as ilvr, with `model.latent_rescale`: fed-back states at the targets' norm.

Variants start from the same random-init model (model.tiny_*; the settings and the reasons for
them: docs/method.md). `--set base_steps=N` first trains one shared base on map reading (style
"perceive") that every variant starts from; it did not help in the probes, so it is off.
Outputs: `<out>/results.json`, `<out>/<variant>/export`,
`<out>/method.md` with the table and plots (`--docs DIR` also writes them to DIR/method/table.md and
DIR/method/*.png). `--quick` is the CI size (under 5 minutes, no latent probe): a smoke run, not a result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.sources import synthetic_vsp, vsp  # noqa: E402
from ilvr.training.spawn import free_port  # noqa: E402

TEXT_STYLES = ("direct", "text-coords", "text-moves")


@dataclass(frozen=True)
class Variant:
    name: str
    style: str  # synthetic_vsp style of its training data
    stage: str  # train.stage
    targets: str  # loss.targets
    modes: tuple[str, ...]  # decoding modes evaluated
    about: str
    change: bool = False  # loss.change_weight = Settings.change_weight (a named option beyond the method)
    rescale: bool = False  # model.latent_rescale: fed-back states at the stage-1 targets' mean norm


VARIANTS = (
    Variant("direct", "direct", "1", "pooled", ("text",), "question -> \\boxed{plan}"),
    Variant("cot-coords", "text-coords", "1", "pooled", ("text",), "text CoT with coordinates"),
    Variant("cot-moves", "text-moves", "1", "pooled", ("text",), "text CoT, moves only"),
    Variant("ilvr-stage1", "latent-moves", "1", "teacher", ("latent",), "ILVR stage 1 only"),
    Variant("ilvr", "latent-moves", "1+2", "teacher", ("latent", "constant-latent", "shuffled-latent"),
            "ILVR stage 1 + 2 (the method)"),
    Variant("ilvr-pooled", "latent-moves", "1+2", "pooled", ("latent", "constant-latent", "shuffled-latent"),
            "ILVR 1 + 2, fixed pooled targets (no teacher)"),
    Variant("ilvr-change", "latent-moves", "1+2", "teacher", ("latent", "constant-latent", "shuffled-latent"),
            "ILVR 1 + 2, selection led by what changed (loss.change_weight; not the method)", change=True),
    Variant("ilvr-rescale", "latent-moves", "1+2", "teacher", ("latent", "constant-latent", "shuffled-latent"),
            "ILVR 1 + 2 with model.latent_rescale (fed-back states at the targets' norm)", rescale=True),
)
DEFAULT_VARIANTS = ("direct", "cot-coords", "cot-moves", "ilvr-stage1", "ilvr", "ilvr-pooled")

# paired comparisons on the same maps (exact McNemar, ilvr/evaluation/paired.py): (A variant, A mode, B variant, B mode)
PAIRS = (
    ("ilvr", "latent", "ilvr", "constant-latent"),
    ("ilvr", "latent", "ilvr", "shuffled-latent"),
    ("ilvr", "latent", "cot-moves", "text"),
    ("ilvr", "latent", "ilvr-stage1", "latent"),
    ("ilvr", "latent", "ilvr-pooled", "latent"),
    ("ilvr-pooled", "latent", "ilvr-pooled", "constant-latent"),
    ("ilvr-pooled", "latent", "ilvr-pooled", "shuffled-latent"),
    ("ilvr-change", "latent", "ilvr-change", "constant-latent"),
    ("ilvr-change", "latent", "ilvr-change", "shuffled-latent"),
    ("ilvr-change", "latent", "ilvr", "latent"),
    ("ilvr", "latent", "direct", "text"),
    ("ilvr-rescale", "latent", "ilvr-rescale", "constant-latent"),
    ("ilvr-rescale", "latent", "ilvr-rescale", "shuffled-latent"),
    ("ilvr-rescale", "latent", "ilvr", "latent"),
)


@dataclass
class Settings:
    """Everything that sizes the experiment; the same for every variant."""

    out: str = "runs/method"
    min_size: int = 3  # 3x3 only: reading and planning on 3x3 take ~900 steps of 16 maps (docs/method.md);
    max_size: int = 3  # larger maps need more steps than six variants can have in the time budget
    train_maps: int = 4000
    test_maps: int = 300
    real_limit: int = 0  # 0 = all 400 real maps
    base_steps: int = 0  # perception pre-training of the shared base (0 = variants start from random init)
    # a base model directory from scripts/pretrain_perception.py (its processor too): every variant starts from it
    base_model: str = ""
    change_weight: float = 2.0  # loss.change_weight of the ilvr-change variant
    steps: int = 900
    stage1_fraction: float = 0.6  # of `steps`, for the 1+2 variants
    latent_size: int = 4
    batch_size: int = 8  # per rank; 2 ranks
    lr: float = 3e-4  # 1e-3 and above: the models stall at the chance loss (docs/method.md)
    warmup_steps: int = 50
    tiny_hidden: int = 128
    tiny_layers: int = 4
    tiny_heads: int = 4
    tiny_vision_hidden: int = 64
    tiny_vision_depth: int = 2
    tiny_rope_theta: float = 10.0  # mrope at base 1e4 cannot tell an image's columns apart (docs/method.md)
    patch_size: int = 32  # x merge 2 = 64 px = one square of the benchmark's images: one merged token per square
    question: str = "short"  # synthetic_vsp.QUESTIONS: the task in ~30 tokens, not ~200 of rules nobody reads
    system_prompt: str = ""  # none: it would push the map away from the sequence start (docs/method.md)
    freeze_vision: bool = True  # a trainable tower trained from scratch collapses to one direction (docs/method.md)
    real_ablations: bool = True  # also evaluate the ablation modes on the real maps
    latent_probe: bool = True  # the linear probe of the latents (ilvr.evaluation.latent_probe)
    max_new_tokens: int = 200
    eval_batch_size: int = 50
    seed: int = 42
    variants: list = field(default_factory=lambda: list(DEFAULT_VARIANTS))

    @classmethod
    def quick(cls, out: str) -> "Settings":
        return cls(out=out, min_size=3, max_size=3, train_maps=128, test_maps=16, real_limit=4, base_steps=0,
                   steps=40, warmup_steps=5, lr=2e-3, tiny_hidden=64, tiny_layers=2, tiny_vision_hidden=32,
                   tiny_vision_depth=1, max_new_tokens=64, eval_batch_size=16, real_ablations=False,
                   latent_probe=False)


# ----------------------------------------------------------------------------- running things


class StepFailed(RuntimeError):
    pass


def run(cmd: list[str], log_path: Path, env: "dict | None" = None) -> None:
    """Run `cmd` with its output in `log_path`; on failure raise with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise StepFailed(f"{' '.join(cmd[:4])} ... exited {rc}; the end of {log_path}:\n" + "\n".join(tail))


def say(text: str) -> None:
    print(f"[method-table {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ----------------------------------------------------------------------------- the pipeline


class Experiment:
    def __init__(self, s: Settings, real_root: "Path | None"):
        self.s = s
        self.out = Path(s.out).resolve()
        self.real_root = real_root
        self.env = {"MLFLOW_TRACKING_URI": f"sqlite:///{self.out / 'mlflow.db'}",
                    "MLFLOW_EXPERIMENT_NAME": "method-table", "DS_ACCELERATOR": "cpu",
                    "TOKENIZERS_PARALLELISM": "false"}
        self.py = sys.executable

    def prepare(self, style: str, seed: int, n: int, name: str) -> str:
        dest = self.out / "data" / name
        if not (dest / "manifest.json").is_file():
            run([self.py, "-m", "data_pipeline.prepare", "--source", "synthetic", "--style", style,
                 "--num-samples", str(n), "--seed", str(seed), "--min-size", str(self.s.min_size),
                 "--max-size", str(self.s.max_size), "--question", self.s.question, "--out", str(dest), "--prefix", name,
                 "--samples-per-shard", str(max(64, n // 8)), "--no-progress", "--overwrite"],
                self.out / "logs" / f"prepare-{name}.log")
        return str(dest)

    def data(self) -> dict:
        s, shards = self.s, {}
        styles = sorted({v.style for v in VARIANTS if v.name in s.variants})
        for style in styles:
            shards[style] = self.prepare(style, 0, s.train_maps, f"train-{style}")
        shards["test"] = self.prepare("direct", 1, s.test_maps, "test")  # prompts + maps; the answer is unused
        if s.base_steps:
            shards["perceive"] = self.prepare("perceive", 2, s.train_maps, "train-perceive")
        if self.real_root is not None:
            dest = self.out / "data" / "vsp-real"
            if not (dest / "manifest.json").is_file():
                prompt = next(k for k, q in vsp.SYNTHETIC_QUESTION.items() if q == s.question)
                cmd = [self.py, "-m", "data_pipeline.prepare", "--source", "vsp", "--vsp-prompt", prompt,
                       "--input", str(self.real_root / "test_direct.jsonl"), "--image-root", str(self.real_root),
                       "--out", str(dest), "--prefix", "vsp", "--samples-per-shard", "100", "--no-progress",
                       "--overwrite"]
                run(cmd, self.out / "logs" / "prepare-vsp-real.log")
            shards["real"] = str(dest)
        processor = self.out / "processor"
        if self.s.base_model:  # its own processor: the base's tokenizer and image settings
            processor = Path(self.s.base_model).resolve()
        elif not (processor / "tokenizer_config.json").is_file():
            run([self.py, "-m", "data_pipeline.tiny_processor", "--shards", ",".join(shards[k] for k in shards
                 if k not in ("test", "real")), "--out", str(processor), "--patch-size", str(s.patch_size),
                 "--min-pixels", str((s.patch_size * 2 * 3) ** 2), "--max-pixels", str((s.patch_size * 2 * 8) ** 2),
                 "--system-prompt", s.system_prompt],
                self.out / "logs" / "processor.log")
        shards["processor"] = str(processor)
        return shards

    def config(self, name: str, train_shards: str, processor: str, init: str, stage: str, targets: str,
               steps: int, stage1_steps: int, loss: "dict | None" = None, model: "dict | None" = None) -> Path:
        loss, model = loss or {}, model or {}
        s = self.s
        cfg = {
            "data": {"train_shards": train_shards, "processor": processor, "batch_size": s.batch_size,
                     "num_workers": 1, "shuffle_buffer": 256, "mode": "resampled", "max_length": 1024,
                     "seed": 0},
            "model": {"name_or_path": init, "latent_size": s.latent_size, "freeze_vision": s.freeze_vision, "dtype": "fp32",
                      "tiny_hidden": s.tiny_hidden, "tiny_layers": s.tiny_layers, "tiny_heads": s.tiny_heads,
                      "tiny_vision_hidden": s.tiny_vision_hidden, "tiny_vision_depth": s.tiny_vision_depth,
                      "tiny_rope_theta": s.tiny_rope_theta, **model},
            "loss": {"targets": targets, **loss},
            "train": {"output_dir": str(self.out / name / "train"), "stage": stage, "max_steps": steps,
                      "stage1_steps": stage1_steps, "lr": s.lr, "warmup_steps": s.warmup_steps,
                      "lr_schedule": "cosine", "ema_decay": 0.99, "seed": s.seed, "save_every": 0,
                      "keep_last": 1},
        }
        path = self.out / name / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def variant_config(self, v: Variant, shards: dict, init: str) -> Path:
        """The training config of variant `v`: its style's shards, its stage(s) and targets, its options."""
        s = self.s
        stage1 = round(s.steps * s.stage1_fraction) if v.stage == "1+2" else 0
        model = {"latent_rescale": True} if v.rescale else {}
        return self.config(v.name, shards[v.style], shards["processor"], init, v.stage, v.targets, s.steps, stage1,
                           self.variant_loss(v), model)

    def variant_loss(self, v: Variant) -> dict:
        """loss.* fields variant `v` sets beyond the defaults."""
        return {"change_weight": self.s.change_weight} if v.change else {}

    def train_and_export(self, name: str, config: Path) -> tuple[str, float]:
        """ilvr-train on 2 ranks (torchrun: one launcher process, where DeepSpeed's CLI starts two), then
        ilvr-export; returns (export dir, seconds)."""
        export = self.out / name / "export"
        if (export / "ilvr_settings.json").is_file():
            say(f"{name}: exported model found, not retrained")
            return str(export), 0.0
        t0 = time.time()
        shutil.rmtree(self.out / name / "train", ignore_errors=True)  # this script's own run dir
        run([self.py, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "ilvr/train.py",
             "--deepspeed", "ds_configs/zero2.json", "--config", str(config), "--resume", "never"],
            self.out / "logs" / f"train-{name}.log", self.env)
        run([self.py, "-m", "ilvr.export", "--checkpoint", str(self.out / name / "train"), "--out", str(export),
             "--overwrite"], self.out / "logs" / f"export-{name}.log", self.env)
        return str(export), time.time() - t0

    def evaluate(self, name: str, export: str, shards: str, bench: str, mode: str) -> dict:
        dest = self.out / name / "eval" / f"{bench}-{mode}"
        if not (dest / "metrics.json").is_file():
            limit = ["--limit", str(self.s.real_limit)] if bench == "real" and self.s.real_limit else []
            run([self.py, "-m", "ilvr.evaluate", "run", "--model", export, "--shards", shards, "--benchmark", "vsp",
                 "--mode", mode, "--max-new-tokens", str(self.s.max_new_tokens), "--batch-size",
                 str(self.s.eval_batch_size), "--out", str(dest), "--run-name", f"{name}-{bench}-{mode}",
                 "--no-progress", *limit], self.out / "logs" / f"eval-{name}-{bench}-{mode}.log", self.env)
        return json.loads((dest / "metrics.json").read_text())["metrics"]

    def target_diagnostics(self, name: str, export: str, processor: str, loss: dict) -> dict:
        """scripts/target_diagnostics.py on the trained model: what its teacher's selection would pick (changed
        squares, a probe of the player's square from the targets) and the swap test of the targets."""
        dest = self.out / name / "target_diagnostics.json"
        if not dest.is_file():
            sets = [f"{k}={v}" for k, v in loss.items()]
            run([self.py, str(ROOT / "scripts" / "target_diagnostics.py"), "--model", export, "--processor", processor,
                 "--maps", str(self.s.test_maps), "--min-size", str(self.s.min_size), "--max-size", str(self.s.max_size),
                 "--latent-size", str(self.s.latent_size), "--swap", "--out", str(dest), *(["--set", *sets] if sets else [])],
                self.out / "logs" / f"targets-{name}.log", {**self.env, "OMP_NUM_THREADS": "1"})
        return json.loads(dest.read_text())

    def latent_probe(self, name: str, export: str, shards: str) -> dict:
        """ilvr.evaluation.latent_probe: can the player's square be read linearly from the latents?"""
        dest = self.out / name / "latent_probe.json"
        if not dest.is_file():
            try:
                run([self.py, "-m", "ilvr.evaluation.latent_probe", "--model", export, "--shards", shards,
                     "--limit", str(self.s.test_maps), "--max-new-tokens", str(self.s.max_new_tokens),
                     "--out", str(dest)], self.out / "logs" / f"probe-{name}.log", self.env)
            except StepFailed as e:  # e.g. no latent segment generated: a finding, not a crash
                return {"error": str(e).splitlines()[0]}
        return json.loads(dest.read_text())


# ----------------------------------------------------------------------------- results


def wilson(k: float, n: float) -> list:
    from ilvr.evaluation.report_data import wilson as w

    lo, hi = w(k, n)
    return [round(lo, 4), round(hi, 4)]


def summarize_eval(m: dict) -> dict:
    n = m["num_samples"]
    levels = sorted(k.split("/")[1] for k in m if k.startswith("accuracy/"))
    return {
        "success": m["accuracy"], "ci95": wilson(m["num_correct"], n), "n": int(n),
        "unparseable_rate": m["unparseable_rate"], "random_plan_baseline": m.get("baseline"),
        "per_level": {lv: {"success": m[f"accuracy/{lv}"], "n": int(m[f"count/{lv}"]),
                           "ci95": wilson(m[f"accuracy/{lv}"] * m[f"count/{lv}"], m[f"count/{lv}"]),
                           "random_plan_baseline": m.get(f"baseline/{lv}")} for lv in levels},
    }


def paired_tests(out: Path, variants: dict, real: bool) -> list[dict]:
    """PAIRS that were run, each with its exact McNemar counts on the synthetic (and real) maps."""
    from ilvr.evaluation.paired import compare_dirs

    rows = []
    for a, ma, b, mb in PAIRS:
        if ma not in variants.get(a, {}).get("modes", {}) or mb not in variants.get(b, {}).get("modes", {}):
            continue
        row = {"a": f"{a} {ma}", "b": f"{b} {mb}"}
        for bench in ("synthetic", "real") if real else ("synthetic",):
            da, db = out / a / "eval" / f"{bench}-{ma}", out / b / "eval" / f"{bench}-{mb}"
            if (da / "predictions.jsonl").is_file() and (db / "predictions.jsonl").is_file():
                row[bench] = compare_dirs(str(da), str(db))
        rows.append(row)
    return rows


def training_summary(run_dir: Path) -> dict:
    """From the trainer's metrics.jsonl: the loss at the start and the end; for stage 1, K*, alignment (first
    pad, later pads, copy baseline) and norms over its first and its last 10% of steps; stage 2's fed norm."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}

    def mean(key, part):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else None

    tenth = max(1, len(rows) // 10)
    out = {"steps": rows[-1].get("step"), "loss_first": mean("loss", rows[:tenth]),
           "loss_last": mean("loss", rows[-tenth:]), "ce_last": mean("ce", rows[-tenth:]),
           "step_time_s": sum(r.get("step_s", 0.0) for r in rows)}
    stage1 = [r for r in rows if r.get("stage") == 1 and r.get("latent/segments")]
    cut = max(1, len(stage1) // 10)
    for key in ("selected_mean", "align_first", "align_later", "align_copy", "target_norm", "fed_norm",
                "changed_share", "changed_chance"):
        for when, part in (("start", stage1[:cut]), ("end", stage1[-cut:])):
            value = mean(f"latent/{key}", part)
            if value is not None:
                out[f"stage1/{key}" + ("" if when == "end" else "_start")] = value
    value = mean("latent/fed_norm", [r for r in rows if r.get("stage") == 2])
    if value is not None:
        out["stage2/fed_norm"] = value
    return out


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI size: a few minutes, checks only that it all runs")
    p.add_argument("--out", default=None, help="output dir (default runs/method, runs/method-quick with --quick)")
    p.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "vsp_test"),
                   help="the real VSP test set (test_direct.jsonl + imgs_test/); skipped when absent")
    p.add_argument("--variants", nargs="+", default=None, choices=[v.name for v in VARIANTS])
    p.add_argument("--docs", default=None, help="also write method.md and its plots into this dir (e.g. docs)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override a Settings field")
    args = p.parse_args(argv)
    out = args.out or ("runs/method-quick" if args.quick else "runs/method")
    s = Settings.quick(out) if args.quick else Settings(out=out)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Settings)} or key in ("out", "variants"):
            p.error(f"--set {item}: unknown field {key!r} (--out and --variants have options of their own)")
        kind = type(getattr(s, key))
        try:
            setattr(s, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
        except ValueError:
            p.error(f"--set {item}: {key} must be a {kind.__name__}")
    if s.question not in synthetic_vsp.QUESTIONS:
        p.error(f"--set question={s.question}: choose one of {', '.join(synthetic_vsp.QUESTIONS)}")
    if s.base_steps and s.base_model:
        p.error("--set base_steps and base_model: give one base")
    if s.base_model and not (Path(s.base_model) / "config.json").is_file():
        p.error(f"--set base_model={s.base_model}: no config.json there; make one with "
                "python scripts/pretrain_perception.py --out DIR")
    if args.variants:
        s.variants = args.variants
    real = Path(args.real)
    if not (real / "test_direct.jsonl").is_file():
        say(f"the real VSP test set is not at {real} (../shared absent): the real-map columns are skipped")
        real = None
    exp = Experiment(s, real)
    exp.out.mkdir(parents=True, exist_ok=True)
    recorded = exp.out / "settings.json"  # outputs found in --out are reused: only under the same settings
    mine = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("variants", "out")}
    earlier = exp.out / "results.json"
    if recorded.is_file() or earlier.is_file():
        theirs = json.loads(recorded.read_text()) if recorded.is_file() else json.loads(earlier.read_text())["settings"]
        theirs = {k: v for k, v in theirs.items() if k not in ("variants", "out")}
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            p.error(f"{exp.out} holds a run made with other settings ({', '.join(changed)}): its data and models "
                    "would be reused; give a new --out")
    recorded.write_text(json.dumps(mine, indent=2))
    t_start = time.time()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_report import write_report  # scripts/method_report.py

    say(f"settings: {json.dumps(dataclasses.asdict(s))}")
    previous = {}
    if (exp.out / "results.json").is_file():
        shutil.copyfile(exp.out / "results.json", exp.out / "results.json.previous")
        previous = json.loads((exp.out / "results.json").read_text()).get("variants", {})
    shards = exp.data()
    say(f"data ready: {', '.join(sorted(shards))}")
    init, base = (str(Path(s.base_model).resolve()), {"model": s.base_model, "train_s": 0.0}) if s.base_model else ("tiny", {})
    if s.base_steps:
        cfg = exp.config("base", shards["perceive"], shards["processor"], "tiny", "1", "pooled", s.base_steps, 0)
        init, secs = exp.train_and_export("base", cfg)
        base = {"steps": s.base_steps, "train_s": secs, "training": training_summary(exp.out / "base" / "train")}
        say(f"base (map reading, {s.base_steps} steps) exported in {secs:.0f} s")
    results = {"settings": dataclasses.asdict(s), "base": base, "variants": {}}
    trained_any = bool(base and base["train_s"])
    for v in VARIANTS:
        if v.name not in s.variants:
            continue
        cfg = exp.variant_config(v, shards, init)
        export, secs = exp.train_and_export(v.name, cfg)
        trained_any = trained_any or secs > 0
        summary = training_summary(exp.out / v.name / "train")
        # reused: the time it took when trained, else the steps' logged time
        secs = secs or previous.get(v.name, {}).get("train_s", 0.0) or summary.get("step_time_s", 0.0)
        entry = {"about": v.about, "style": v.style, "stage": v.stage, "targets": v.targets, "train_s": secs,
                 "export": export, "training": summary, "modes": {}}
        for mode in v.modes:
            row = {"synthetic": summarize_eval(exp.evaluate(v.name, export, shards["test"], "synthetic", mode))}
            if "real" in shards and (mode == v.modes[0] or s.real_ablations):
                real_m = summarize_eval(exp.evaluate(v.name, export, shards["real"], "real", mode))
                row["vsp_real"] = {lv: d["success"] for lv, d in real_m["per_level"].items()}
                row["vsp_real_detail"] = real_m
            entry["modes"][mode] = row
        if v.style.startswith("latent-") and s.latent_probe:
            entry["latent_probe"] = exp.latent_probe(v.name, export, shards["test"])
        if v.targets == "teacher" and s.latent_probe:
            entry["targets"] = exp.target_diagnostics(v.name, export, shards["processor"], exp.variant_loss(v))
        first = entry["modes"][v.modes[0]]
        entry.update({"synthetic": first["synthetic"], "vsp_real": first.get("vsp_real"),
                      "unparseable_rate": first["synthetic"]["unparseable_rate"]})
        results["variants"][v.name] = entry
        say(f"{v.name}: synthetic success {first['synthetic']['success']:.3f} "
            f"(random plan {first['synthetic']['random_plan_baseline']:.3f}), unparseable "
            f"{first['synthetic']['unparseable_rate']:.3f}, trained in {secs:.0f} s")
        (exp.out / "results.json").write_text(json.dumps(results, indent=2))
    results["paired"] = paired_tests(exp.out, results["variants"], "real" in shards)
    results["elapsed_s"] = time.time() - t_start
    before = exp.out / "results.json.previous"
    if not trained_any and before.is_file():  # regenerated from existing outputs: keep the time the run took
        results["elapsed_s"] = json.loads(before.read_text()).get("elapsed_s", results["elapsed_s"])
        results["regenerated"] = True
    elif not trained_any:  # assembled from variants trained in other runs: no one wall time
        results["regenerated"] = True
        results["elapsed_s"] = None
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
    results["date"] = time.strftime("%Y-%m-%d")
    (exp.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, exp.out, Path(args.docs) if args.docs else None)
    say(f"done in {(time.time() - t_start) / 60:.1f} min: {exp.out / 'results.json'}, {exp.out / 'method.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
