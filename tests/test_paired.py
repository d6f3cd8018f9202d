"""The exact McNemar test of two evaluations on the same samples (ilvr/evaluation/paired.py)."""
from __future__ import annotations

import json
import math

import pytest

from ilvr.evaluation.paired import compare_dirs, main, mcnemar_exact, paired_outcomes


def binomial_two_sided(b: int, c: int) -> float:
    """The same p-value summed the other way: every outcome at most as likely as the observed one."""
    n = b + c
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[b] * (1 + 1e-12)))


@pytest.mark.parametrize("b, c", [(0, 6), (6, 0), (1, 9), (3, 3), (0, 0), (12, 30), (40, 41), (0, 1)])
def test_exact_p_value(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c), rel=1e-9)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_known_values():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(5, 5) == 1.0


def test_only_discordant_samples_count():
    a = {str(i): i < 60 for i in range(100)}
    b = {str(i): i < 50 or 90 <= i < 92 for i in range(100)}
    r = paired_outcomes(a, b)
    assert (r["both"], r["only_a"], r["only_b"], r["neither"], r["n"]) == (50, 10, 2, 38, 100)
    assert r["p_value"] == pytest.approx(mcnemar_exact(10, 2))
    assert r["a_success"] == 0.6 and r["b_success"] == 0.52


def _write(dirpath, outcomes):
    dirpath.mkdir()
    rows = [{"id": k, "correct": v, "prediction": "x"} for k, v in outcomes.items()]
    (dirpath / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(dirpath)


def test_cli_pairs_by_id_and_reports_unpaired(tmp_path, capsys):
    a = _write(tmp_path / "a", {"m1": True, "m2": True, "m3": False, "x": True})
    b = _write(tmp_path / "b", {"m3": True, "m2": False, "m1": True})
    r = compare_dirs(a, b)
    assert (r["n"], r["only_a"], r["only_b"], r["dropped"]) == (3, 1, 1, 1)
    assert main([a, b]) == 0
    assert "1 unpaired ids dropped" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "predictions.jsonl").write_text('{"id": "m1"}\n')
    assert main([a, str(tmp_path / "c")]) == 2
