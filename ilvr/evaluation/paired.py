"""Are two evaluations of the same samples different? The exact McNemar test on paired outcomes.

Two modes (latent vs constant-latent) or two models scored on the SAME maps are paired: their
overlapping 95% intervals say little, because most maps are solved or failed by both. Only the
discordant maps carry the difference: b = solved by A only, c = solved by B only. Under "no
difference" each discordant map is a fair coin, so the two-sided exact p-value is
min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]).

    python -m ilvr.evaluation.paired EVAL_DIR_A EVAL_DIR_B [--json]

Each EVAL_DIR holds an `ilvr-eval` predictions.jsonl (rows with "id" and "correct"); the test uses
the ids both hold and says how many it dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there is none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_outcomes(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """Counts and the p-value for two {sample id: correct} maps over the ids both hold."""
    ids = sorted(set(a) & set(b))
    both = sum(a[i] and b[i] for i in ids)
    only_a = sum(a[i] and not b[i] for i in ids)
    only_b = sum(b[i] and not a[i] for i in ids)
    n = len(ids)
    return {"n": n, "a_success": (both + only_a) / n if n else 0.0, "b_success": (both + only_b) / n if n else 0.0,
            "both": both, "only_a": only_a, "only_b": only_b, "neither": n - both - only_a - only_b,
            "p_value": mcnemar_exact(only_a, only_b), "dropped": len(set(a) ^ set(b))}


def read_outcomes(eval_dir: str) -> dict[str, bool]:
    """{id: correct} from an evaluation directory's predictions.jsonl."""
    path = os.path.join(eval_dir, "predictions.jsonl")
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "id" not in row or "correct" not in row:
                raise ValueError(f"{path}:{n}: a prediction row without 'id' and 'correct' (not scored yet?)")
            out[str(row["id"])] = bool(row["correct"])
    return out


def compare_dirs(dir_a: str, dir_b: str) -> dict:
    return paired_outcomes(read_outcomes(dir_a), read_outcomes(dir_b))


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    a = p.parse_args(argv)
    try:
        r = compare_dirs(a.a, a.b)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['n']} paired samples: A {100 * r['a_success']:.1f}%, B {100 * r['b_success']:.1f}%; "
              f"A only {r['only_a']}, B only {r['only_b']}, both {r['both']}, neither {r['neither']}; "
              f"exact McNemar p = {r['p_value']:.3g}" + (f" ({r['dropped']} unpaired ids dropped)" if r["dropped"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
