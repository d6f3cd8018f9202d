"""bench/quickstart_step.py --smoke, structure only (timings are never asserted): the variants train the same
model, the floored buckets issue fewer reduce-scatters than transformers' rule, and the matmul patch embedding
gives the Conv3d's features. (--smoke runs the two variants that differ most; "threads" differs from "before"
only in OMP_NUM_THREADS.)"""
from __future__ import annotations

import json

import pytest
import torch

from bench import quickstart_step

pytestmark = pytest.mark.slow


def test_the_variants_train_the_same_model_with_fewer_collectives(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        assert quickstart_step.main(["--smoke", "--steps", "8", "--stage1-steps", "6", "--samples", "100",
                                     "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert set(result["step_s"]) == {"before", "now"}
    assert all(set(v) == {"1", "2"} or set(v) == {"1"} for v in result["step_s"].values())
    assert len(set(round(v, 5) for v in result["final_loss"].values())) == 1  # same data, seeds, numerics
    calls = result["reduce_scatter_calls_per_step"]
    assert calls["auto (floored)"] == 1 and calls["h^2 buckets"] > 10
    assert result["patch_embed"]["max_abs_diff"] < 1e-4 and result["patch_embed"]["patches"] > 0
