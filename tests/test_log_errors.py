"""A failed run's console ends with the failing ranks' tracebacks (scripts/quickstart.sh prints them)."""
from __future__ import annotations

from ilvr.training.log_errors import error_blocks, main

TRAIN_LOG = """\
2026-12-07 02:33:08,823 [rank 0] INFO ilvr.training.trainer: step 1/4 (25%, eta 2s, 5.96 samples/s) loss=6.762
2026-12-07 02:33:09,101 [rank 1] ERROR ilvr.train: training failed: AttributeError: 'Qwen2_5_VLAttention' object has no attribute '_kernel_funcs'
Traceback (most recent call last):
  File "/work/main/ilvr/train.py", line 70, in main
    Trainer(cfg, ds_path, resume=args.resume).run()
  File "/work/main/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1964, in __getattr__
    raise AttributeError(
AttributeError: 'Qwen2_5_VLAttention' object has no attribute '_kernel_funcs'
[2026-12-07 02:33:09,500] [INFO] [launch.py:335:sigkill_handler] Killing subprocess 4242
2026-12-07 02:33:09,650 [rank 0] INFO ilvr.training.trainer: stage 2 from step 3 on
"""


def test_error_records_come_with_their_whole_traceback_and_nothing_else():
    blocks = error_blocks(TRAIN_LOG)
    assert len(blocks) == 1
    lines = blocks[0].splitlines()
    assert lines[0].startswith("2026-12-07 02:33:09,101 [rank 1] ERROR ilvr.train: training failed")
    assert lines[1] == "Traceback (most recent call last):" and lines[-1].startswith("AttributeError: ")
    assert len(lines) == 7  # the launcher's and rank 0's next lines are not part of it


def test_long_tracebacks_keep_their_start_and_their_end():
    text = "2026-12-07 02:00:00,000 [rank 0] ERROR x: boom\n" + "".join(f"  frame {i}\n" for i in range(500))
    lines = error_blocks(text, max_lines=40)[0].splitlines()
    assert len(lines) == 40 and lines[0].endswith("boom") and lines[-1] == "  frame 499"


def test_without_an_error_record_the_last_lines_are_shown(tmp_path, capsys):
    log = tmp_path / "console.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "ModuleNotFoundError: No module named 'x'\n")
    assert main([str(tmp_path / "missing.log"), str(log)]) == 0
    out = capsys.readouterr().out
    assert "no error record" in out and out.rstrip().endswith("No module named 'x'") and "line 69" not in out
    (tmp_path / "train.log").write_text(TRAIN_LOG)
    assert main([str(tmp_path / "train.log"), str(log)]) == 0
    assert "_kernel_funcs" in capsys.readouterr().out
