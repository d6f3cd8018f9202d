"""scripts/perception_probe.py runs (its measurements are docs/method.md's; here only that it still works)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "perception_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("perception_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_probe_trains_and_reports_held_out_digit_accuracy(probe, capsys):
    assert probe.main(["--task", "locate", "--freeze-vision", "--steps", "2", "--train-maps", "16", "--hidden", "64",
                       "--layers", "1", "--text-before-image", "5"]) == 0
    out = capsys.readouterr().out
    first = int(re.search(r"first image token is token (\d+)", out).group(1))
    assert first >= 11  # <|im_start|>, user, \n, >= 5 tokens of filler words, <|vision_start|>, ... (6 without filler)
    assert "step 2: loss" in out and "held-out digit accuracy" in out


def test_answers_name_what_the_task_asks(probe):
    map_desc = [[1, 0, -1], [0, -1, 0], [0, 0, 2]]
    assert probe.answer("row", map_desc) == "The player is in row 0."
    assert probe.answer("count", map_desc) == "There are 2 holes."
    assert probe.answer("locate", map_desc) == "The player is at (0,0). The goal is at (2,2)."
