"""scripts/method_table.py: every variant's training config (all of them, cheaply), and a --quick run in which
four variants train, export and are evaluated and the table is written.

Only what must hold at this size is asserted (the ILVR loss falls, its answers parse); what the
variants score is the full run's business (docs/method.md), never CI's. The quick run leaves out cot-coords,
cot-moves and ilvr-stage1 (a minute each): their configs are checked below; a text variant trains, exports and is
evaluated in it (direct: the same path with another data style); their data styles are generated and checked in
tests/test_synthetic_vsp.py, and stage "1" with the teacher trains in tests/test_elastic.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK_VARIANTS = ["direct", "ilvr", "ilvr-pooled"]
# what each variant is (docs/method.md): its training data's style, train.stage, loss.targets
ILVR = ("latent-moves", "1+2", "teacher")
VARIANTS = {"direct": ("direct", "1", "pooled"), "cot-coords": ("text-coords", "1", "pooled"),
            "cot-moves": ("text-moves", "1", "pooled"), "ilvr-stage1": ("latent-moves", "1", "teacher"),
            "ilvr": ILVR, "ilvr-pooled": ("latent-moves", "1+2", "pooled"), "ilvr-change": ILVR, "ilvr-rescale": ILVR}


def test_every_variant_trains_its_style_stage_and_targets(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import method_table as mt

    from ilvr.config import load_config

    settings = mt.Settings.quick(str(tmp_path))
    exp = mt.Experiment(settings, None)
    shards = {style: f"shards-{style}" for style in {v.style for v in mt.VARIANTS}} | {"processor": "proc"}
    assert [v.name for v in mt.VARIANTS] == list(VARIANTS) and set(QUICK_VARIANTS) <= set(mt.DEFAULT_VARIANTS)
    for v in mt.VARIANTS:
        cfg = load_config([str(exp.variant_config(v, shards, "tiny"))], check_paths=False)
        assert cfg.data.processor == "proc"
        assert (cfg.data.train_shards.removeprefix("shards-"), cfg.train.stage, cfg.loss.targets) == VARIANTS[v.name]
        assert cfg.train.max_steps == settings.steps
        assert cfg.train.stage1_steps == (round(settings.steps * settings.stage1_fraction) if v.stage == "1+2" else 0)
        assert cfg.loss.change_weight == (settings.change_weight if v.name == "ilvr-change" else 0.0), v.name
        assert cfg.model.latent_rescale == (v.name == "ilvr-rescale"), v.name
        assert cfg.model.freeze_vit and cfg.model.freeze_aligner and cfg.model.name_or_path == "tiny"
        text = v.style in mt.TEXT_STYLES
        assert (v.modes == ("text",)) == text and (v.targets == "pooled" or not text), v.name


def test_quick_method_table(tmp_path):
    out = tmp_path / "method"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "scripts/method_table.py", "--quick", "--out", str(out), "--variants",
                           *QUICK_VARIANTS], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    names = QUICK_VARIANTS
    assert list(results["variants"]) == names
    table = (out / "method.md").read_text()
    for name in names:
        entry = results["variants"][name]
        assert f"| {name} |" in table
        assert (out / name / "export" / "ilvr_settings.json").is_file()
        synthetic = entry["synthetic"]
        assert synthetic["n"] == 16 and 0.0 <= synthetic["success"] <= 1.0
        assert 0.0 < synthetic["random_plan_baseline"] < 1.0
    ilvr = results["variants"]["ilvr"]
    # the stated margin: over 40 steps from random init the loss (mean of the last 10% of steps) falls by at
    # least 40% from where it started (mean of the first 10%)
    assert ilvr["training"]["loss_last"] < 0.6 * ilvr["training"]["loss_first"], ilvr["training"]
    assert ilvr["unparseable_rate"] <= 0.25, ilvr["synthetic"]
    assert set(ilvr["modes"]) == {"latent", "constant-latent", "shuffled-latent"}
    assert ilvr["training"]["stage1/selected_mean"] >= 1.0  # the teacher selected targets in stage 1
    assert "stage1/selected_mean" not in results["variants"]["ilvr-pooled"]["training"] or \
        results["variants"]["ilvr-pooled"]["training"]["stage1/selected_mean"] == 4.0  # pooled: always K
    if (REPO.parent / "shared" / "data" / "vsp_test").is_dir():
        assert set(ilvr["vsp_real"]) <= {"level3", "level4", "level5", "level6"} and ilvr["vsp_real"]
    # the paired tests of the pairs that ran, on the same synthetic maps (exact McNemar counts)
    pairs = {(row["a"], row["b"]): row for row in results["paired"]}
    assert set(pairs) == {("ilvr latent", "ilvr constant-latent"), ("ilvr latent", "ilvr shuffled-latent"),
                          ("ilvr latent", "ilvr-pooled latent"), ("ilvr latent", "direct text"),
                          ("ilvr-pooled latent", "ilvr-pooled constant-latent"),
                          ("ilvr-pooled latent", "ilvr-pooled shuffled-latent")}
    assert all(row["synthetic"]["n"] == 16 for row in pairs.values()), pairs
    assert (out / "figures" / "success.png").stat().st_size > 1000
