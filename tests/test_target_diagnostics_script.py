"""scripts/target_diagnostics.py runs on a few maps and reports the three readings."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from data_pipeline.tiny_processor import build_tiny_processor
from tests.factories import corpus_texts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "target_diagnostics.py"


def test_the_script_reports_changed_share_probe_and_swap(tmp_path):
    processor = build_tiny_processor(str(tmp_path / "p"), corpus_texts()[:40], patch_size=32, min_pixels=192 ** 2,
                                     max_pixels=512 ** 2, system_prompt="")
    spec = importlib.util.spec_from_file_location("target_diagnostics", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "r.json"
    assert script.main(["--model", "tiny", "--processor", processor, "--maps", "8", "--swap", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["maps"] == 8 and result["segments"] >= 8  # every 3x3 plan has at least one move
    assert 0.0 <= result["changed_share"] <= 1.0 and 0.0 < result["changed_chance"] < 1.0
    assert {"row", "col"} <= set(result["player_probe"]) and "swap_ce_rise" in result
