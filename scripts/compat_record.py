"""Record what scripts/compat.sh found: docs/compat.md (date, versions, result), and, asked to, the lock file.

    python scripts/compat_record.py --venv .venv-compat --log LOG --rc 0 --what "..." --seconds 420 --out docs/compat.md
    python scripts/compat_record.py --venv .venv-compat --write-lock scripts/constraints-cpu.txt

Run with the venv's own python: the versions are read with importlib.metadata from the running interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import platform
import re

# the packages whose releases have broken (or could break) a run; all of them are in the lock
WATCHED = ("torch", "deepspeed", "transformers", "kernels", "accelerate", "tokenizers", "huggingface_hub",
           "safetensors", "mlflow", "webdataset", "pillow", "gymnasium", "numpy", "pyyaml", "pytest")
LOCK_HEADER = """\
# The exact versions the test suite passed with on CPU (Python {python}, {date}): scripts/setup.sh installs
# with these as pip constraints, so the quick start and CI never take what the registry published this
# morning. setup.py keeps ranges for clusters. To move to newer releases: scripts/compat.sh (docs/install.md).
"""


def installed() -> dict[str, str]:
    """name -> version of every distribution in this interpreter's environment (the project itself left out)."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in ("ilvr-train", "pip", "setuptools", "wheel"):
            out[name] = dist.version
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def summary_line(log: str) -> str:
    """pytest's closing line ('12 passed, 1 failed in 300s'), or the last line of the log."""
    lines = [line.strip("= \n") for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line
    return lines[-1] if lines else "(no output)"


def write_record(args) -> None:
    versions = {k.lower().replace("-", "_"): v for k, v in installed().items()}
    log = open(args.log, encoding="utf-8", errors="replace").read() if args.log else ""
    failed = [line.split(" ", 1)[1] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    rows = "\n".join(f"| {name} | {versions.get(name.lower().replace('-', '_'), '(not installed)')} |" for name in WATCHED)
    text = f"""# The newest releases, tried (scripts/compat.sh)

Written by `bash scripts/compat.sh`; the tested set that the quick start and CI install is
`scripts/constraints-cpu.txt` (docs/install.md).

- date: {datetime.date.today().isoformat()} (Python {platform.python_version()}, {platform.machine()})
- what ran: {args.what}, {args.seconds // 60} min {args.seconds % 60} s with the install
- result: **{"passed" if args.rc == 0 else "FAILED"}** ({summary_line(log)})
{"".join(f"- failed: `{name}`{chr(10)}" for name in failed)}
| package | newest allowed by setup.py |
| --- | --- |
{rows}
"""
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"compat: {'passed' if args.rc == 0 else 'FAILED'}; recorded in {args.out}")


def write_lock(path: str) -> None:
    pins = [f"{name}=={version.split('+')[0] if name == 'torch' else version}" for name, version in installed().items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write(LOCK_HEADER.format(python=platform.python_version()[:4], date=datetime.date.today().isoformat()))
        f.write("\n".join(pins) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", required=True, help="(for the record; the versions are this interpreter's)")
    p.add_argument("--log", default=None)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--what", default="the compat smoke")
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--write-lock", default=None, metavar="PATH")
    args = p.parse_args()
    if args.write_lock:
        write_lock(args.write_lock)
    if args.out:
        write_record(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
