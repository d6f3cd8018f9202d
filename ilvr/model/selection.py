"""Stage-1 teacher targets: which helper-image features each latent segment is taught to produce.

ONE teacher pass per batch, whatever the number of latent segments (the reference runs
one per segment). For segment t of a sample the context query is the mean of the UNIT
vectors of
  (a) a user-turn summary: the mean teacher state over the prompt's text tokens, averaged
      with the input-image states weighted by prompt->image attention of the last layer;
  (b) the mean teacher state over the assistant tokens just before the segment: from the
      previous segment's `<|latent_end|>` (or the first assistant token) through this
      segment's `<|latent_start|>`;
  (c) for t > 0, the mean of the vectors selected for segment t-1.
Each part is normalised first: (a) and (b) are final-layer states (norm ~8 on the tiny
model), (c) lives in the input-embedding space (norm ~0.2), and a plain mean would let (c)
vanish. The prompt is every leading untrained (-100) token of a sample, so the system
message and the assistant header are part of it: they are the same for every sample, and
the image weights do not depend on rows that precede the images. "Teacher state" is the
final (post-norm) hidden state. Candidates are the helper image's vision+merger features
(LLM input space), pooled over contiguous raster chunks to at most L.

Scores: cosine(candidate, query), standardised over each segment's candidates
(`loss.score_norm="standardize"`, the default: cosines of pooled image features are bunched,
so a fixed temperature on raw cosines gives a near-flat softmax and K* = K always) ->
softmax(/temperature) -> take the most probable until their mass reaches coverage_p, at
most K, at least 1. The K* picks are kept in decreasing probability (`loss.target_order`,
the reference's order; "raster" sorts them back into image order, which makes consecutive
targets neighbouring patches that the alignment loss can match by copying its input).

`loss.query_parts` keeps a subset of (a), (b), (c) (a diagnostic; all three is the method).
`loss.change_weight` > 0 (NOT the method; off by default) adds that multiple of each candidate's
standardised change since the previous image (1 - cosine to the candidate at the same index of the
previous helper image, or of the input image for a sample's first segment; zero where the two images
have a different number of candidates) to the standardised scores. docs/method.md measures why: the
context query favours candidates that look like what came before, so it passes over what changed.

Every teacher module is called in every step (dummy images when there are none), so the
teacher may be a ZeRO-3-partitioned module whose ranks must make the same calls.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline.encode import IGNORE_INDEX
from ilvr.model.inputs import dummy_image, embed_tokens, image_features, rope_positions


@dataclass
class Selection:
    """Targets for the batch's latent segments, in `latent_segments` order."""

    targets: torch.Tensor  # [S, K, H], zeros beyond counts[s]
    counts: torch.Tensor  # [S] long, K* per segment
    max_prob: torch.Tensor  # [S] float, the largest candidate probability
    num_candidates: torch.Tensor  # [S] long, candidates after pooling
    queries: "torch.Tensor | None" = None  # [S, H] fp32, the context query of each segment
    # [S, K] long: which of its helper's candidates each target is (-1 beyond counts[s]); the candidates are
    # the helper's merged tokens pooled to at most `candidate_rows` (pool_rows), so diagnostics can map
    # targets back to squares (ilvr/model/changed_squares.py)
    picks: "torch.Tensor | None" = None
    candidate_rows: int = 0


def pool_rows(features: torch.Tensor, sizes: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `features` [N, H] into consecutive groups of `sizes`; mean-pool each group over contiguous
    chunks down to at most `max_rows` rows. Returns (pooled [G, R, H] fp32, mask [G, R])."""
    device, width = features.device, features.shape[-1]
    groups = sizes.numel()
    rows = int(min(max_rows, int(sizes.max()))) if groups else 1
    group = torch.repeat_interleave(torch.arange(groups, device=device), sizes)
    offset = torch.cumsum(sizes, 0) - sizes
    j = torch.arange(features.shape[0], device=device) - offset[group]
    n = sizes[group]
    slot = torch.where(n > max_rows, j * max_rows // n, j)  # chunk c holds rows floor(c*n/L)..
    flat = group * rows + slot
    sums = features.new_zeros(groups * rows, width, dtype=torch.float32).index_add_(0, flat, features.float())
    count = torch.bincount(flat, minlength=groups * rows).to(torch.float32)
    pooled = sums / count.clamp(min=1)[:, None]
    return pooled.view(groups, rows, width), (count > 0).view(groups, rows)


def helper_candidates(teacher, batch: dict[str, Any], max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each helper image's features (vision encoder + merger), pooled to <= max_rows: ([G, R, H], [G, R])."""
    pixels, grid = batch["helper_pixel_values"], batch["helper_image_grid_thw"]
    device = batch["input_ids"].device
    if grid.numel() == 0:  # keep the vision calls identical across ranks
        pixels, dummy_grid = dummy_image(teacher, device)
        feats = image_features(teacher, pixels, dummy_grid)
        empty = feats.new_zeros(0, 1, feats.shape[-1], dtype=torch.float32)
        return empty, torch.zeros(0, 1, dtype=torch.bool, device=device)
    feats = image_features(teacher, pixels.to(device), grid.to(device))
    merge = teacher.config.vision_config.spatial_merge_size
    return pool_rows(feats, grid.to(device).prod(-1) // merge**2, max_rows)


def candidate_scores(cands: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, score_norm: str) -> torch.Tensor:
    """cosine(candidate, query) [S, R], standardised over each row's valid candidates when
    score_norm == "standardize" (zero mean, unit std; a row of equal scores stays all zero)."""
    cos = F.cosine_similarity(cands.float(), query.float()[:, None, :], dim=-1)
    if score_norm == "none":
        return cos
    if score_norm != "standardize":
        raise ValueError(f"score_norm must be 'standardize' or 'none', got {score_norm!r}")
    return standardize(cos, mask)


def select_by_coverage(cands: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, cap: torch.Tensor,
                       temperature: float, coverage_p: float, width: int, score_norm: str = "none",
                       order: str = "probability"):
    """Coverage selection for S queries at once: (targets [S, width, H], counts [S], max prob [S]).

    cands [S, R, H] with mask [S, R] (padding never picked); cap [S] bounds K* (<= width).
    Picks come in decreasing probability (order="probability") or in raster order ("raster").
    """
    picks, counts, max_prob = coverage_picks(cands, mask, query, cap, temperature, coverage_p, width, score_norm,
                                             order)
    return gather_picks(cands, picks), counts, max_prob


def gather_picks(cands: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The candidates [S, R, H] that `picks` [S, width] name, zero where a pick is -1. [S, width, H]."""
    picked = cands.gather(1, picks.clamp(min=0)[..., None].expand(-1, -1, cands.shape[-1]))
    return picked * (picks >= 0)[..., None]


def coverage_picks(cands: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, cap: torch.Tensor,
                   temperature: float, coverage_p: float, width: int, score_norm: str = "none",
                   order: str = "probability", extra: "torch.Tensor | None" = None):
    """select_by_coverage's choice as candidate indices: (picks [S, width] long, -1 past counts; counts [S];
    max prob [S]). `extra` [S, R] is added to the scores before the softmax (the change term)."""
    scores = candidate_scores(cands, mask, query, score_norm)
    if extra is not None:
        scores = scores + extra
    probs = (scores / temperature).masked_fill(~mask, float("-inf")).softmax(-1)
    sorted_p, ranked = probs.sort(dim=-1, descending=True, stable=True)
    counts = (sorted_p.cumsum(-1) < coverage_p).sum(-1) + 1
    counts = torch.minimum(counts, torch.minimum(cap, mask.sum(-1))).clamp(min=1)
    if ranked.shape[1] < width:
        ranked = F.pad(ranked, (0, width - ranked.shape[1]))
    keep = torch.arange(width, device=cands.device) < counts[:, None]
    picks = torch.where(keep, ranked[:, :width], cands.shape[1])  # unpicked slots: past the end
    if order == "raster":
        picks = picks.sort(-1).values
    elif order != "probability":
        raise ValueError(f"order must be 'probability' or 'raster', got {order!r}")
    return torch.where(keep, picks, -1), counts, sorted_p[:, 0]


def sample_spans(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, start, end) of each sample: rows of a right-padded batch, or the pieces of a packed row."""
    ids = batch["input_ids"]
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].to(ids.device, torch.long)
        return torch.zeros_like(cu[:-1]), cu[:-1], cu[1:]
    rows = torch.arange(ids.shape[0], device=ids.device)
    mask = batch.get("attention_mask")
    ends = mask.sum(1).long() if mask is not None else torch.full_like(rows, ids.shape[1])
    return rows, torch.zeros_like(rows), ends


def span_tokens(rows, starts, ends):
    """Every token of the spans [start, end) as (span index, row, column), flat."""
    lengths = (ends - starts).clamp(min=0)
    span = torch.repeat_interleave(torch.arange(lengths.numel(), device=rows.device), lengths)
    offset = torch.cumsum(lengths, 0) - lengths
    cols = starts[span] + torch.arange(span.numel(), device=rows.device) - offset[span]
    return span, rows[span], cols


def prompt_ends(labels: torch.Tensor, rows, starts, ends) -> torch.Tensor:
    """Index of each sample's first trained token: its prompt is [start, prompt end). [n]."""
    span, r, c = span_tokens(rows, starts, ends)
    trained = labels[r, c] != IGNORE_INDEX
    return ends.clone().scatter_reduce_(0, span[trained], c[trained], "amin")


def span_means(values, rows, starts, ends, weights=None) -> torch.Tensor:
    """Weighted mean of values [B, T, H] over each span (fp32, zero for empty spans). [n, H]."""
    span, r, c = span_tokens(rows, starts, ends)
    w = torch.ones(span.numel(), device=values.device) if weights is None else weights[r, c].float()
    sums = values.new_zeros(rows.numel(), values.shape[-1], dtype=torch.float32)
    sums.index_add_(0, span, values[r, c].float() * w[:, None])
    total = torch.zeros(rows.numel(), device=values.device).index_add_(0, span, w)
    return sums / total.clamp(min=1e-12)[:, None]


def prompt_image_weights(teacher, layer_input, positions, rows, starts, prompt_end, is_image) -> tuple:
    """Prompt->image attention of the last decoder layer, recomputed from its input states.

    Softmax over each prompt row's causal keys, averaged over heads and prompt-text rows,
    renormalised over image tokens (equal weights when it sums to zero). Returns the weights
    [n, P] over each sample's prompt (left-aligned) and the gather indices (row, col) [n, P].
    """
    lm = teacher.model.language_model
    layer, attn = lm.layers[-1], lm.layers[-1].self_attn
    length = int((prompt_end - starts).max())
    cols = starts[:, None] + torch.arange(length, device=rows.device)
    valid = cols < prompt_end[:, None]
    cols = cols.clamp(max=layer_input.shape[1] - 1)
    r = rows[:, None].expand_as(cols)
    x = layer.input_layernorm(layer_input[r, cols])
    cos, sin = lm.rotary_emb(x, positions[:, r, cols])
    n, p = cols.shape
    q = attn.q_proj(x).view(n, p, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, p, -1, attn.head_dim).transpose(1, 2)
    apply_rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    q, k = apply_rope(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # as repeat_kv: head h reads kv head h // groups
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    eye = torch.eye(p, dtype=torch.bool, device=x.device)
    allowed = (torch.ones_like(eye).tril() & valid[:, None, None, :]) | eye
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)  # [n, P, P]
    image = is_image[r, cols] & valid
    text_rows = (valid & ~image).float()
    to_keys = (probs * text_rows[:, :, None]).sum(1) / text_rows.sum(1, keepdim=True).clamp(min=1)
    w = to_keys * image
    total = w.sum(1, keepdim=True)
    equal = image.float() / image.sum(1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, w / total.clamp(min=1e-30), equal), (r, cols)


def teacher_states(teacher, batch: dict[str, Any]):
    """ONE teacher pass: (final hidden states [B, T, H], input of the last layer [B, T, H], 3-row positions,
    input embeddings [B, T, H])."""
    embeds = embed_tokens(teacher, batch, always_run_vision=True)
    positions, _ = rope_positions(teacher, batch)
    lm = teacher.model.language_model
    last = len(lm.layers) - 1
    out = lm(inputs_embeds=embeds, position_ids=positions, attention_mask=batch.get("attention_mask"),
             use_cache=False, output_hidden_states=[last])
    return out.last_hidden_state, out.hidden_states[last], positions[-3:], embeds


def standardize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [S, R] with zero mean and unit std over each row's valid entries (a constant row becomes zero)."""
    m = mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1)
    mean = (x * m).sum(-1, keepdim=True) / n
    std = (((x - mean) ** 2) * m).sum(-1, keepdim=True).div(n).sqrt()
    return (x - mean) / std.clamp(min=1e-6) * m


def change_scores(cands: torch.Tensor, mask: torch.Tensor, before: torch.Tensor, before_mask: torch.Tensor):
    """1 - cosine(candidate, the candidate at the same index of the image before) [S, R], standardised per
    row; zero for a row whose two images have a different number of candidates (no square-to-square map)."""
    same = (mask.sum(-1) == before_mask.sum(-1))[:, None] & mask & before_mask
    change = 1 - F.cosine_similarity(cands.float(), before.float(), dim=-1)
    return standardize(change * same, same)


def input_image_candidates(embeds, is_image, seg_row, prompt_end, sizes, max_rows: int):
    """For each given segment: the last `sizes[i]` image tokens before its sample's prompt end (the input
    image a first helper image follows), pooled as helper candidates are. ([S, R, H], mask [S, R]); a row
    is all-masked when the prompt holds fewer image tokens."""
    rows, masks = [], []
    for r, end, n in zip(seg_row.tolist(), prompt_end.tolist(), sizes.tolist()):
        cols = is_image[r, :end].nonzero().squeeze(1)
        if cols.numel() >= n:
            pooled, m = pool_rows(embeds[r, cols[-n:]], torch.tensor([n], device=embeds.device), max_rows)
        else:
            pooled = embeds.new_zeros(1, 1, embeds.shape[-1], dtype=torch.float32)
            m = torch.zeros(1, 1, dtype=torch.bool, device=embeds.device)
        rows.append(pooled[0])
        masks.append(m[0])
    width = max(x.shape[0] for x in rows)
    feats = torch.stack([F.pad(x, (0, 0, 0, width - x.shape[0])) for x in rows])
    return feats, torch.stack([F.pad(m, (0, width - m.shape[0])) for m in masks])


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1 (a zero row stays zero): query parts live at different scales."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def segment_order(owner, first_pad, size):
    """Per segment: its ordinal t within its sample, the previous segment (index) and that one's end marker."""
    before = (owner[:, None] == owner[None, :]) & (first_pad[None, :] < first_pad[:, None])
    ordinal = before.sum(1)
    prev = torch.where(before, first_pad[None, :], -1).argmax(1)
    return ordinal, prev, first_pad[prev] + size[prev]


@torch.no_grad()
def pooled_targets(model, batch: dict[str, Any], latent_size: int) -> Selection:
    """The Mirage-style ablation (`loss.targets: pooled`): no teacher and no selection. Each segment is
    taught its helper image's features from `model` itself (the student, no gradients), mean-pooled
    over contiguous raster chunks to K rows; all K pads are targets (K* = K, or the candidates when an
    image has fewer than K merged tokens)."""
    device = batch["input_ids"].device
    seg = batch["latent_segments"].to(device)
    cands, cmask = helper_candidates(model, batch, latent_size)
    n_seg = seg.shape[0]
    if n_seg and int(seg[:, 2].max()) > latent_size:
        raise ValueError(f"a latent segment has {int(seg[:, 2].max())} pads > latent_size {latent_size}")
    width = cands.shape[-1]
    targets = cands.new_zeros(n_seg, latent_size, width)
    if n_seg:
        helper = seg[:, 3]
        picked, mask = cands[helper], cmask.to(device)[helper]
        targets[:, :picked.shape[1]] = picked * mask[..., None]
        counts = torch.minimum(mask.sum(1), seg[:, 2])
    else:
        counts = torch.zeros(0, dtype=torch.long, device=device)
    slots = torch.arange(latent_size, device=device)
    picks = torch.where(slots < counts[:, None], slots, -1)
    return Selection(targets, counts, torch.ones(n_seg, device=device), counts.clone(), picks=picks,
                     candidate_rows=latent_size)


@torch.no_grad()
def select_targets(teacher, batch: dict[str, Any], loss_cfg, latent_size: int) -> Selection:
    """Stage-1 targets for every latent segment of `batch` from one teacher pass (no gradients)."""
    device = batch["input_ids"].device
    seg = batch["latent_segments"].to(device)
    cands, cmask = helper_candidates(teacher, batch, loss_cfg.max_candidates)
    cmask = cmask.to(device)
    final, layer_input, positions, embeds = teacher_states(teacher, batch)
    rows, starts, ends = sample_spans(batch)
    prompt_end = prompt_ends(batch["labels"].to(device), rows, starts, ends)
    is_image = batch["mm_token_type_ids"].to(device).bool()

    text = span_means(final, rows, starts, prompt_end, weights=~is_image)
    weights, (pr, pc) = prompt_image_weights(teacher, layer_input, positions, rows, starts, prompt_end, is_image)
    image = (weights[..., None] * final[pr, pc].float()).sum(1)
    has_image = (is_image[pr, pc] & (pc < prompt_end[:, None])).any(1)
    user = unit(torch.where(has_image[:, None], (text + image) / 2, text))

    n_seg, hidden = seg.shape[0], final.shape[-1]
    targets = final.new_zeros(n_seg, latent_size, hidden, dtype=cands.dtype)
    counts = torch.zeros(n_seg, dtype=torch.long, device=device)
    max_prob = torch.zeros(n_seg, device=device)
    picks = torch.full((n_seg, latent_size), -1, dtype=torch.long, device=device)
    if n_seg == 0:
        return Selection(targets, counts, max_prob, counts.clone(), picks=picks, candidate_rows=loss_cfg.max_candidates)
    if int(seg[:, 2].max()) > latent_size:
        raise ValueError(f"a latent segment has {int(seg[:, 2].max())} pads > latent_size {latent_size}")
    seg_row, first_pad, size, helper = seg.unbind(1)
    inside = (rows[None] == seg_row[:, None]) & (starts[None] <= first_pad[:, None]) & (first_pad[:, None] < ends[None])
    owner = inside.float().argmax(1)
    ordinal, prev, prev_end = segment_order(owner, first_pad, size)
    context = unit(span_means(final, seg_row, torch.where(ordinal > 0, prev_end, prompt_end[owner]), first_pad))

    use = {q.strip() for q in loss_cfg.query_parts.split(",")}
    picked_mean = torch.zeros(n_seg, hidden, device=device)
    queries = torch.zeros(n_seg, hidden, device=device)
    for t in range(int(ordinal.max()) + 1):
        idx = (ordinal == t).nonzero().squeeze(1)
        parts = ([user[owner[idx]]] if "user" in use else []) + ([context[idx]] if "context" in use else [])
        if t > 0 and "previous" in use:
            parts.append(unit(picked_mean[prev[idx]]))
        query = torch.stack(parts).mean(0) if parts else torch.zeros(idx.numel(), hidden, device=device)
        h = helper[idx]
        extra = None
        if loss_cfg.change_weight > 0:
            if t > 0:
                before, before_mask = cands[helper[prev[idx]]], cmask[helper[prev[idx]]]
            else:
                merge = teacher.config.vision_config.spatial_merge_size
                sizes = batch["helper_image_grid_thw"].to(device)[h].prod(-1) // merge**2
                before, before_mask = input_image_candidates(embeds, is_image, seg_row[idx], prompt_end[owner[idx]],
                                                             sizes, loss_cfg.max_candidates)
                before = F.pad(before, (0, 0, 0, cands.shape[1] - before.shape[1]))[:, :cands.shape[1]]
                before_mask = F.pad(before_mask, (0, cands.shape[1] - before_mask.shape[1]))[:, :cands.shape[1]]
            extra = loss_cfg.change_weight * change_scores(cands[h], cmask[h], before, before_mask)
        pk, cnt, mp = coverage_picks(cands[h], cmask[h], query, size[idx], loss_cfg.temperature,
                                     loss_cfg.coverage_p, latent_size, loss_cfg.score_norm, loss_cfg.target_order,
                                     extra)
        tg = gather_picks(cands[h], pk)
        targets[idx], counts[idx], max_prob[idx], queries[idx], picks[idx] = tg.to(targets.dtype), cnt, mp, query, pk
        picked_mean[idx] = tg.float().sum(1) / cnt[:, None]
    return Selection(targets, counts, max_prob, cmask[helper].sum(1), queries, picks,
                     loss_cfg.max_candidates)
