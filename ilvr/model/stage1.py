"""Stage-1 loss: teacher-forced latents with selective perceptual supervision (ILVR_METHOD.md, Stage 1).

    out = stage1_loss(student, teacher, batch, cfg.loss, cfg.model.latent_size, generator)
    out.loss.backward()

The teacher (any module with the student's architecture: an EMA copy, or the student
itself) picks K* <= K helper-image features per latent segment (selection.py). The first
K* pads of each segment take those vectors (detached, plus N(0, noise^2)) as input
embeddings; the rest of the segment keeps the pad token's embedding. The student is
trained with CE on its text and with 1 - cos(h_{i-1}, e_i) between the state before each
injected pad and that pad's clean target: at inference h_{i-1} is what gets fed back.
Padded and packed batches give the same loss (latent_segments are in batch coordinates).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.encode import IGNORE_INDEX
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
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


def injection_sites(segments: torch.Tensor, selection: Selection) -> Injection:
    """The first K* pads of each segment, in segment then pad order, with their clean targets."""
    counts = selection.counts
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    j = torch.arange(seg.numel(), device=counts.device) - (torch.cumsum(counts, 0) - counts)[seg]
    segments = segments.to(counts.device)
    return Injection(segments[seg, 0], segments[seg, 1] + j, selection.targets[seg, j])


def inject(embeds: torch.Tensor, sites: Injection, noise_std: float,
           generator: "torch.Generator | None" = None) -> torch.Tensor:
    """`embeds` with the (detached, noised) targets at the injection sites; out of place, so autograd
    still reaches the token embeddings elsewhere."""
    values = sites.targets.detach().float()
    if noise_std > 0 and values.numel():
        device = generator.device if generator is not None else values.device
        noise = torch.randn(values.shape, generator=generator, device=device)
        values = values + noise_std * noise.to(values.device)
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


def _stats(selection: Selection, h_prev: torch.Tensor, e: torch.Tensor, cos: torch.Tensor, k: int) -> dict:
    """Selected counts, alignment and norms as plain numbers (0.0 where the batch has no segment)."""
    counts = selection.counts

    def mean(x):
        return float(x.float().mean()) if x.numel() else 0.0

    return {
        "segments": int(counts.numel()),
        "selected_mean": mean(counts),
        "selected_hist": torch.bincount(counts.cpu(), minlength=k + 1)[1:k + 1].tolist(),
        "align_cos": mean(cos.detach()),
        "fed_norm": mean(h_prev.detach().float().norm(dim=-1)),
        "target_norm": mean(e.float().norm(dim=-1)),
        "max_prob": mean(selection.max_prob),
        "candidates_mean": mean(selection.num_candidates),
    }


def stage1_loss(student, teacher, batch: dict[str, Any], loss_cfg, latent_size: int,
                generator: "torch.Generator | None" = None) -> Stage1Output:
    """One stage-1 forward: teacher targets (no grad), injected student forward, CE + alignment."""
    selection = select_targets(teacher, batch, loss_cfg, latent_size)
    sites = injection_sites(batch["latent_segments"], selection)
    embeds = embed_tokens(student, batch, always_run_vision=True)
    embeds = inject(embeds, sites, loss_cfg.target_noise, generator)
    positions, _ = rope_positions(student, batch)
    hidden, _ = run_decoder(student, embeds, positions, batch.get("attention_mask"))

    ce = shifted_ce(student, hidden, batch["labels"].to(hidden.device))
    h_prev = hidden[sites.rows, sites.cols - 1]
    e = sites.targets.detach()
    cos = F.cosine_similarity(h_prev.float(), e.float(), dim=-1)
    align = (1.0 - cos).mean() if cos.numel() else hidden.sum() * 0.0
    loss = loss_cfg.w_ce * ce + loss_cfg.w_align * align
    return Stage1Output(loss, ce, align, _stats(selection, h_prev, e, cos, latent_size))
