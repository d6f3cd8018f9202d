"""Stage-1 loss: teacher-forced latents with selective perceptual supervision (ILVR_METHOD.md, Stage 1).

    out = stage1_loss(student, teacher, batch, cfg.loss, cfg.model.latent_size, generator)
    out.loss.backward()

The teacher (any module with the student's architecture: an EMA copy, or the student
itself) picks K* <= K helper-image features per latent segment (selection.py). The first
K* pads of each segment take those vectors (detached; in training plus Gaussian noise of
norm ~ `target_noise` x the target's norm) as input embeddings; the rest of the segment
keeps the pad token's embedding. The student is trained with CE on its text and with
1 - cos(h_{i-1}, e_i) between the state before each injected pad and that pad's CLEAN
target (the noise is on the input side only): at inference h_{i-1} is what gets fed back.
Padded and packed batches give the same loss (latent_segments are in batch coordinates).

Reading the alignment: at pad i > 0 of a segment the input already holds e_{i-1}, so a
student that copies its input scores cos(e_{i-1}, e_i) (`align_copy`, the copy baseline: two
consecutive targets WITHIN one segment, not two consecutive helper images); at the first pad no
copy is possible (`align_first`). Whether the targets can carry the state at all:
`changed_share` (changed_squares.py), the share of segments whose picks include a square that
changed since the previous image, against `changed_chance` for random picks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.encode import IGNORE_INDEX
from ilvr.model.changed_squares import changed_stats
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.latent_scale import rescale
from ilvr.model.selection import Selection, select_targets


@dataclass
class Stage1Output:
    loss: torch.Tensor  # w_ce * ce + w_align * align
    ce: torch.Tensor  # mean CE over trained (shifted) tokens
    align: torch.Tensor  # mean 1 - cos(h_{i-1}, e_i) over injected pads
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Injection:
    """Where targets went: flat (row, column) of every injected pad and its clean target [N, H]."""

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    slots: "torch.Tensor | None" = None  # index of each site within its segment (0 = first pad)


def injection_sites(segments: torch.Tensor, selection: Selection) -> Injection:
    """The first K* pads of each segment, in segment then pad order, with their clean targets."""
    counts = selection.counts
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    j = torch.arange(seg.numel(), device=counts.device) - (torch.cumsum(counts, 0) - counts)[seg]
    segments = segments.to(counts.device)
    return Injection(segments[seg, 0], segments[seg, 1] + j, selection.targets[seg, j], j)


def inject(embeds: torch.Tensor, sites: Injection, noise: float,
           generator: "torch.Generator | None" = None) -> torch.Tensor:
    """`embeds` with the (detached, noised) targets at the injection sites; out of place, so autograd
    still reaches the token embeddings elsewhere.

    `noise` is relative: each target e gets N(0, (noise * ||e|| / sqrt(H))^2) per component, a
    noise vector of norm ~ noise * ||e|| whatever the model's feature scale (an absolute std
    of 0.01 would be 38% of the tiny model's target norm and ~0.1% of another model's)."""
    values = sites.targets.detach().float()
    if noise > 0 and values.numel():
        device = generator.device if generator is not None else values.device
        draw = torch.randn(values.shape, generator=generator, device=device).to(values.device)
        rms = values.norm(dim=-1, keepdim=True) / values.shape[-1] ** 0.5
        values = values + noise * rms * draw
    return embeds.index_put((sites.rows, sites.cols), values.to(embeds.dtype))


def shifted_ce(student, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over trained labels. Only the rows that predict a trained token go
    through lm_head (the full [T, vocab] logits of a long sequence would not fit)."""
    target = labels[:, 1:]
    trained = target != IGNORE_INDEX
    logits = student.lm_head(hidden[:, :-1][trained])
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target[trained])


def _stats(selection: Selection, sites: Injection, h_prev: torch.Tensor, cos: torch.Tensor, k: int,
           latent_norm: "float | None") -> dict:
    """Selected counts, alignment (with its first-pad part and copy baseline) and norms as plain
    numbers (0.0 where the batch has no segment); `fed_sum` / `fed_count`: the states that
    inference would feed back here (rescaled when the option is on), for the constant-latent ablation."""
    counts, e, slots = selection.counts, sites.targets.detach(), sites.slots

    def mean(x):
        return float(x.float().mean()) if x.numel() else 0.0

    later = slots > 0  # sites whose input already holds the previous target
    idx = later.nonzero().squeeze(1)
    copy = F.cosine_similarity(e[idx - 1].float(), e[idx].float(), dim=-1) if idx.numel() else cos[:0]
    fed = rescale(h_prev.detach(), latent_norm).float()
    return {
        "segments": int(counts.numel()),
        "selected_mean": mean(counts),
        "selected_hist": torch.bincount(counts.cpu(), minlength=k + 1)[1:k + 1].tolist(),
        "align_cos": mean(cos.detach()),
        "align_first": mean(cos.detach()[~later]),
        "align_later": mean(cos.detach()[later]),
        "align_copy": mean(copy),
        "fed_norm": mean(h_prev.detach().float().norm(dim=-1)),
        "target_norm": mean(e.float().norm(dim=-1)),
        "max_prob": mean(selection.max_prob),
        "candidates_mean": mean(selection.num_candidates),
        "fed_sum": fed.sum(0),
        "fed_count": int(fed.shape[0]),
    }


def stage1_loss(student, teacher, batch: dict[str, Any], loss_cfg, latent_size: int,
                generator: "torch.Generator | None" = None, latent_norm: "float | None" = None,
                selection: "Selection | None" = None) -> Stage1Output:
    """One stage-1 forward: teacher targets (no grad), injected student forward, CE + alignment.

    Target noise is drawn only when the student is in training mode. `latent_norm` (the
    latent_rescale option) only changes the recorded `fed_sum`: the alignment is a cosine.
    `selection`: the teacher's targets for this batch when the caller computed them already
    (the trainer does, with the teacher's parameters gathered once)."""
    if selection is None:
        selection = select_targets(teacher, batch, loss_cfg, latent_size)
    sites = injection_sites(batch["latent_segments"], selection)
    embeds = embed_tokens(student, batch, always_run_vision=True)
    embeds = inject(embeds, sites, loss_cfg.target_noise if student.training else 0.0, generator)
    positions, _ = rope_positions(student, batch)
    hidden, _ = run_decoder(student, embeds, positions, batch.get("attention_mask"))

    ce = shifted_ce(student, hidden, batch["labels"].to(hidden.device))
    h_prev = hidden[sites.rows, sites.cols - 1]
    e = sites.targets.detach()
    cos = F.cosine_similarity(h_prev.float(), e.float(), dim=-1)
    align = (1.0 - cos).mean() if cos.numel() else hidden.sum() * 0.0
    loss = loss_cfg.w_ce * ce + loss_cfg.w_align * align
    stats = _stats(selection, sites, h_prev, cos, latent_size, latent_norm)
    stats.update(changed_stats(batch, selection, student.config.vision_config.spatial_merge_size))
    return Stage1Output(loss, ce, align, stats)
