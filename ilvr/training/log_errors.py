"""The errors in a run's log, with their tracebacks: what a failed run's console should end with.

    python -m ilvr.training.log_errors runs/x/train.log [console.log]

train.log holds rank 0's lines and every rank's errors (distributed.add_log_file); a launcher's console
interleaves all ranks' output with its own chatter. An error record is its first line ("... [rank N]
ERROR ...") and every following line up to the next log line, i.e. the traceback. When no file has an
error record (a failure before logging started), the last lines of the last file are shown instead.
"""
from __future__ import annotations

import re
import sys

_LOG_LINE = re.compile(r"^(\[?\d{4}-\d\d-\d\d[ T]|\d{4}/\d\d/\d\d )")  # ours, DeepSpeed's, MLflow's stamps
_ERROR = re.compile(r"\[rank \d+\] (ERROR|CRITICAL) ")


def error_blocks(text: str, max_lines: int = 60) -> list[str]:
    """Each error record of `text` with its traceback (at most `max_lines` lines: its start and its end)."""
    blocks: list[list[str]] = []
    current: "list[str] | None" = None
    for line in text.splitlines():
        if _ERROR.search(line) and _LOG_LINE.match(line):
            current = [line]
            blocks.append(current)
        elif current is not None and not _LOG_LINE.match(line):
            current.append(line)
        else:
            current = None
    return ["\n".join(b if len(b) <= max_lines else b[:10] + ["    ..."] + b[-(max_lines - 11):]) for b in blocks]


def main(argv: "list[str] | None" = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or []
    if not paths:
        print("usage: python -m ilvr.training.log_errors LOG [LOG ...]", file=sys.stderr)
        return 2
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append((path, f.read()))
        except OSError:
            continue
    for path, text in texts:
        blocks = error_blocks(text)
        if blocks:
            print(f"-- the errors in {path}:")
            print("\n".join(blocks))
            return 0
    if texts:
        path, text = texts[-1]
        print(f"-- no error record; the last lines of {path}:")
        print("\n".join(text.splitlines()[-30:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
