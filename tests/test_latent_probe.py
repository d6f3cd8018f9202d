"""The latent-state probe: it finds a position written linearly into the latents, and its controls do not."""
from __future__ import annotations

import torch

from ilvr.evaluation.latent_probe import fit_probe, probe


def _examples(informative: bool, n_maps: int = 120, steps: int = 3, width: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, cols, owner, step = [], [], [], []
    for m in range(n_maps):
        for s in range(steps):
            rows.append(int(torch.randint(0, 4, (1,), generator=g)))
            cols.append(int(torch.randint(0, 4, (1,), generator=g)))
            owner.append(m)
            step.append(s)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    x = torch.randn(len(rows), width, generator=g)
    if informative:  # the square written into two directions of the latent
        x[:, 0] += 3.0 * rows
        x[:, 1] += 3.0 * cols
    return x, rows, cols, torch.tensor(owner), torch.tensor(step)


def test_probe_reads_a_linearly_written_position_and_the_controls_do_not():
    result = probe(_examples(informative=True))
    assert result["maps"] == 120 and result["test_examples"] == 180
    for axis in ("row", "col"):
        r = result[axis]
        assert r["probe"] > 0.7, r  # ~0.88 is the best possible with this noise
        assert r["step_only_control"] < 0.45 and r["majority"] < 0.45, r  # 4 classes: chance ~0.25


def test_probe_on_uninformative_latents_stays_near_chance():
    result = probe(_examples(informative=False))
    for axis in ("row", "col"):
        assert result[axis]["probe"] < 0.45, result[axis]


def test_fit_probe_separates_two_clusters():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50, 4, generator=g) - 2, torch.randn(50, 4, generator=g) + 2])
    y = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    assert fit_probe(x[::2], y[::2], x[1::2], y[1::2], 2) > 0.95
