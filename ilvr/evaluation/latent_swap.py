"""Does the text after a latent segment depend on what that segment holds? A swap test.

For every latent segment, the CE of the text that follows it (up to the next segment or the
sample's end) is measured twice in one teacher-forced forward each: with the segment's own
inputs, and with the inputs of the segment of the same ordinal in ANOTHER sample (another map).
All segments of one ordinal are swapped together: samples are independent rows (or packed
pieces), so each segment's following text sees only its own swap. A CE rise says the model
reads the segment; no change says the answer does not flow through it.

Inputs: stage-1 targets (`inputs_from_selection`: K* vectors per segment, the rest of the pads
keep the pad embedding) or stage-2 fed-back latents (`fed_back_latents`: all K pads).

    inputs, counts = inputs_from_selection(select_targets(teacher, batch, cfg.loss, K))
    result = swap_test(student, batch, inputs, counts)   # result["delta"]: mean CE rise
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.encode import IGNORE_INDEX
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.selection import Selection, sample_spans
from ilvr.model.stage1 import Injection, inject


def segment_order(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per segment: its sample (owner), its ordinal within the sample, and where its following text ends
    (the next segment's first pad - 1, i.e. before its start marker, or the sample's end)."""
    seg = batch["latent_segments"]
    rows, starts, ends = (t.cpu() for t in sample_spans(batch))
    seg_row, first_pad = seg[:, 0].cpu(), seg[:, 1].cpu()
    inside = (rows[None] == seg_row[:, None]) & (starts[None] <= first_pad[:, None]) & (first_pad[:, None] < ends[None])
    owner = inside.float().argmax(1)
    same = owner[:, None] == owner[None, :]
    ordinal = (same & (first_pad[None, :] < first_pad[:, None])).sum(1)
    later = same & (first_pad[None, :] > first_pad[:, None])
    next_start = torch.where(later, first_pad[None, :] - 1, ends[owner][:, None]).amin(1)
    return owner, ordinal, next_start


def following_text(batch: dict[str, Any]) -> list[tuple[int, torch.Tensor]]:
    """For each segment: (row, trained columns of the text after its end marker and before the next segment)."""
    seg, labels = batch["latent_segments"].cpu(), batch["labels"].cpu()
    _, _, next_start = segment_order(batch)
    out = []
    for s in range(seg.shape[0]):
        row, end_marker = int(seg[s, 0]), int(seg[s, 1] + seg[s, 2])
        cols = torch.arange(end_marker + 1, int(next_start[s]))
        out.append((row, cols[labels[row, cols] != IGNORE_INDEX]))
    return out


def swap_partners(owner: torch.Tensor, ordinal: torch.Tensor) -> torch.Tensor:
    """For each segment, a segment of the same ordinal in another sample (-1 when none): rolled by one."""
    partner = torch.full_like(owner, -1)
    for t in ordinal.unique():
        idx = (ordinal == t).nonzero().squeeze(1)
        if len(owner[idx].unique()) == len(idx) and len(idx) > 1:  # one segment per sample and ordinal
            partner[idx] = idx.roll(1)
    return partner


def inputs_from_selection(selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 inputs: (targets [S, K, H], counts [S])."""
    return selection.targets, selection.counts


@torch.no_grad()
def fed_back_latents(model, batch: dict[str, Any]) -> torch.Tensor:
    """Stage 2's latent inputs: pad j of every segment takes the final state at pad j - 1 (its start marker
    for j = 0). One decoder pass per (segment ordinal, pad index): a segment's states depend on every
    earlier segment's latents, so earlier segments are completed first. [S, K, H]."""
    seg = batch["latent_segments"]
    k = int(seg[:, 2].max()) if seg.numel() else 0
    _, ordinal, _ = segment_order(batch)
    embeds = embed_tokens(model, batch)
    positions, _ = rope_positions(model, batch)
    fed = embeds.new_zeros(seg.shape[0], k, embeds.shape[-1])
    for t in ordinal.unique().tolist():
        for j in range(k):
            live = ((ordinal.to(seg.device) == t) & (seg[:, 2] > j)).nonzero().squeeze(1)
            if not live.numel():
                continue
            hidden, _ = run_decoder(model, embeds, positions, batch.get("attention_mask"))
            r, c = seg[live, 0], seg[live, 1] + j
            fed[live, j] = hidden[r, c - 1]
            embeds = embeds.index_put((r, c), hidden[r, c - 1])
    return fed


@torch.no_grad()
def _following_ce(model, batch, inputs, counts, text) -> torch.Tensor:
    """Mean CE of each segment's following text with `inputs` [S, K, H] at the first counts[s] pads."""
    seg = batch["latent_segments"]
    n = counts.to(seg.device)
    which = torch.repeat_interleave(torch.arange(seg.shape[0], device=seg.device), n)
    j = torch.arange(which.numel(), device=seg.device) - (torch.cumsum(n, 0) - n)[which]
    sites = Injection(seg[which, 0], seg[which, 1] + j, inputs[which, j])
    embeds = inject(embed_tokens(model, batch), sites, 0.0)
    positions, _ = rope_positions(model, batch)
    hidden, _ = run_decoder(model, embeds, positions, batch.get("attention_mask"))
    labels = batch["labels"]
    out = torch.full((seg.shape[0],), float("nan"))
    for s, (row, cols) in enumerate(text):
        if cols.numel():
            logits = model.lm_head(hidden[row, cols.to(hidden.device) - 1]).float()
            out[s] = F.cross_entropy(logits, labels[row, cols.to(labels.device)]).cpu()
    return out


@torch.no_grad()
def swap_test(model, batch: dict[str, Any], inputs: torch.Tensor, counts: torch.Tensor) -> dict:
    """Per-segment CE of the following text with own and with swapped inputs; `delta` = mean rise over the
    segments that have a partner and following text (nan when none)."""
    owner, ordinal, _ = segment_order(batch)
    partner = swap_partners(owner, ordinal)
    text = following_text(batch)
    own = _following_ce(model, batch, inputs, counts, text)
    swapped = torch.full_like(own, float("nan"))
    for t in ordinal.unique():
        idx = ((ordinal == t) & (partner >= 0)).nonzero().squeeze(1)
        if not idx.numel():
            continue
        order = torch.arange(inputs.shape[0])
        order[idx] = partner[idx]
        ce = _following_ce(model, batch, inputs[order.to(inputs.device)], counts[order.to(counts.device)], text)
        swapped[idx] = ce[idx]
    valid = ~(own.isnan() | swapped.isnan())
    delta = float((swapped - own)[valid].mean()) if valid.any() else float("nan")
    return {"ce": own, "ce_swapped": swapped, "partner": partner, "delta": delta, "segments": int(valid.sum())}
