"""Does a latent segment's selection include what changed? The "changed square" share of stage-1 targets.

A helper image is the state after one more step; what the latent must carry is what changed
since the image before it (VSP: the square the elf left and the square it reached). A merged
image token "changed" when its pixels differ from the same token of the previous image: the
sample's previous helper, or for its first segment its last input image (the same grid is
required; otherwise the segment is not comparable). Pixels, not features: every token of a
tower with global attention moves a little when one square changes, and the question is about
the image, not about a tower. Candidates pooled to L rows (pool_rows) changed when any token
in their chunk did.

    stats = changed_stats(batch, selection)   # {"changed_share", "changed_chance", "changed_segments"}

changed_share: of the comparable segments, the share whose K* picks include a changed candidate.
changed_chance: the same share for K* picks drawn at random from the helper's candidates (the
reference: a teacher that ignores what changed scores about this).
"""
from __future__ import annotations

from typing import Any

import torch

from ilvr.model.selection import Selection, pool_rows


def token_rows(pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Each image's pixels as one row per merged token [n_tokens, merge^2 * D]: the processor lays out
    each merge window's patches consecutively, in the merged tokens' raster order."""
    sizes = (grid_thw.prod(-1)).tolist()
    return [p.reshape(-1, merge * merge * p.shape[-1]) for p in torch.split(pixel_values, sizes)]


def changed_tokens(before: torch.Tensor, after: torch.Tensor, tol: float = 1e-6) -> "torch.Tensor | None":
    """Which merged tokens differ between two images' token rows [n, D] (None when the grids differ)."""
    if before.shape != after.shape:
        return None
    return (after.float() - before.float()).abs().amax(-1) > tol


def previous_images(batch: dict[str, Any]) -> list["tuple[str, int] | None"]:
    """For each helper image: ("helper", g) or ("image", i), the image shown just before its step
    (the sample's previous helper, or its last input image), None when the sample has no input image."""
    n_images, n_helpers = batch["num_images"].tolist(), batch["num_helpers"].tolist()
    out, image_base, helper_base = [], 0, 0
    for n_img, n_help in zip(n_images, n_helpers):
        for j in range(n_help):
            if j:
                out.append(("helper", helper_base + j - 1))
            else:
                out.append(("image", image_base + n_img - 1) if n_img else None)
        image_base += n_img
        helper_base += n_help
    return out


def changed_candidates(batch: dict[str, Any], merge: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed [G, R] bool: candidate r of helper g holds a changed token; comparable [G] bool)."""
    helpers = token_rows(batch["helper_pixel_values"], batch["helper_image_grid_thw"], merge)
    images = token_rows(batch["pixel_values"], batch["image_grid_thw"], merge) if "pixel_values" in batch else []
    n_tokens = torch.tensor([h.shape[0] for h in helpers], dtype=torch.long)
    masks, comparable = [], []
    for g, prev in enumerate(previous_images(batch)):
        before = None if prev is None else (helpers if prev[0] == "helper" else images)[prev[1]]
        changed = None if before is None else changed_tokens(before, helpers[g])
        comparable.append(changed is not None)
        masks.append(changed if changed is not None else torch.zeros(helpers[g].shape[0], dtype=torch.bool))
    if not masks:
        return torch.zeros(0, 1, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
    pooled, _ = pool_rows(torch.cat(masks).float()[:, None].cpu(), n_tokens, max_rows)
    return pooled[..., 0] > 0, torch.tensor(comparable)


def chance_of_a_hit(n_candidates: torch.Tensor, n_changed: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """P(at least one changed among `picks` draws without replacement from n_candidates holding n_changed)."""
    i = torch.arange(int(picks.max()) if picks.numel() else 0, dtype=torch.float64)
    factors = (n_candidates[:, None] - n_changed[:, None] - i) / (n_candidates[:, None] - i)
    factors = torch.where(i < picks[:, None], factors.clamp(min=0), torch.ones_like(factors))
    return 1 - factors.prod(-1)


def changed_stats(batch: dict[str, Any], selection: Selection, merge: int) -> dict[str, float]:
    """changed_share / changed_chance over the batch's comparable segments (0.0 when there is none) and
    changed_segments (how many were comparable)."""
    seg = batch["latent_segments"]
    if selection.picks is None or seg.shape[0] == 0 or "num_helpers" not in batch:
        return {"changed_share": 0.0, "changed_chance": 0.0, "changed_segments": 0}
    changed, comparable = changed_candidates(batch, merge, selection.candidate_rows)
    helper = seg[:, 3].cpu()
    picks = selection.picks.cpu()
    hit = changed[helper].gather(1, picks.clamp(min=0)) & (picks >= 0)
    ok = comparable[helper]
    n_cands = selection.num_candidates.cpu().double()
    chance = chance_of_a_hit(n_cands, changed[helper].sum(1).double(), selection.counts.cpu())
    n = int(ok.sum())
    if n == 0:
        return {"changed_share": 0.0, "changed_chance": 0.0, "changed_segments": 0}
    return {"changed_share": float(hit.any(1)[ok].float().mean()), "changed_chance": float(chance[ok].mean()),
            "changed_segments": n}
