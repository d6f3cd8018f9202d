"""Stage 2 of ILVR: free-running latents trained end to end by text cross-entropy.

Each latent pad's input embedding is the student's own final hidden state (after the
last norm) at the previous position, exactly as at inference: the first pad of a
segment gets the state at `<|latent_start|>`, pad j > 0 the state computed at pad j-1.
Only CE on the labelled tokens is trained, and gradients flow through the fed-back
states (nothing is detached).

`stage2_loss` costs about one forward pass: with a KV cache it runs each text chunk
once and each latent pad as one single-position step. A padded batch is processed in
lockstep: chunk t of every row is padded to the batch's longest chunk t, then the K
latent steps of segment t run for the rows that have it; rows without work in a call
are holes, masked out by an explicit 2-D mask over [cache + current]. Rope positions
are computed once on the whole sequence and sliced, so every token keeps the position
it has in the full sequence. `naive_stage2_loss` is the Coconut-style reference
(one full pass per pad plus a final one) used to test it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data_pipeline.encode import IGNORE_INDEX
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.latent_scale import rescale


@dataclass
class Stage2Output:
    loss: torch.Tensor  # what to backpropagate (= ce: stage 2 has no other term)
    ce: torch.Tensor  # mean CE over the batch's trained tokens
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Call:
    """One decoder call of the lockstep plan: which sequence index each slot holds, and which slots are real."""

    index: torch.Tensor  # [B, n] long, sequence positions (0 in holes)
    live: torch.Tensor  # [B, n] bool; live slots are a prefix of each row
    newest: torch.Tensor  # [B] long, each row's last live slot (0 if none)
    latent: bool  # a single-position step fed with the previous hidden state


def _check_batch(model, batch, uses_cache: bool) -> None:
    if "cu_seqlens" in batch:
        raise ValueError("stage 2 runs the latents through a KV cache and needs padded batches: set data.packing=false")
    if uses_cache and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) and model.training \
            and torch.is_grad_enabled():
        raise ValueError("stage 2 feeds hidden states back through the KV cache, which transformers' (per-layer) "
                         "gradient checkpointing drops: call model.gradient_checkpointing_disable() and pass "
                         "checkpoint_calls=True (the trainer does both for model.gradient_checkpointing=true)")


def _segments_per_row(batch) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """(valid length per row, [(first pad index, K), ...] per row in sequence order), validated."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    rows: list[list[tuple[int, int]]] = [[] for _ in lengths]
    for b, first, k, _ in batch["latent_segments"].tolist():
        rows[b].append((first, k))
    for b, segs in enumerate(rows):
        segs.sort()
        end = -1  # index of the previous segment's <|latent_end|>
        for first, k in segs:
            if k < 1 or first < end + 2 or first + k >= lengths[b]:
                raise ValueError(f"row {b}: latent segment ({first}, {k}) overlaps, lacks a start marker "
                                 f"before it or an end marker after it (row length {lengths[b]})")
            end = first + k
    return [int(n) for n in lengths], rows


def _lockstep_plan(lengths: list[int], rows: list[list[tuple[int, int]]], width: int, device,
                   min_segments: int = 0, min_steps: int = 0):
    """The decoder calls of `stage2_loss` in order (chunk 0, K_0 latent steps, chunk 1, ..., chunk S_max),
    and for each sequence position the slot holding its output in the concatenated outputs ([B, width]).

    Chunk t of a row runs from its segment t-1's `<|latent_end|>` to its segment t's first
    pad (exclusive, so it ends with `<|latent_start|>`); its last chunk runs to the row's
    end. Rows with fewer segments have empty chunks and no steps. Every call has at least
    one slot; `min_segments` / `min_steps` add calls made only of holes, so that every
    rank of a ZeRO-3 job makes the same module calls. Built on the CPU, moved once.
    """
    n_rows, s_max = len(rows), max([len(s) for s in rows] + [min_segments])
    calls: list[_Call] = []
    physical = torch.zeros(n_rows, width, dtype=torch.long)
    offset = 0

    def add(spans: list[tuple[int, int]], latent: bool) -> None:
        nonlocal offset
        n = max(1, max(b - a for a, b in spans))
        index = torch.zeros(n_rows, n, dtype=torch.long)
        live = torch.zeros(n_rows, n, dtype=torch.bool)
        for r, (a, b) in enumerate(spans):
            index[r, :b - a] = torch.arange(a, b)
            live[r, :b - a] = True
            physical[r, a:b] = torch.arange(offset, offset + b - a)
        newest = (live.sum(1) - 1).clamp(min=0)
        calls.append(_Call(index.to(device), live.to(device), newest.to(device), latent))
        offset += n

    starts = [0] * n_rows
    for t in range(s_max + 1):
        add([(starts[r], segs[t][0] if t < len(segs) else (lengths[r] if t == len(segs) else starts[r]))
             for r, segs in enumerate(rows)], latent=False)
        if t == s_max:
            break
        for j in range(max([segs[t][1] for segs in rows if t < len(segs)] + [min_steps])):
            add([(segs[t][0] + j, segs[t][0] + j + 1) if t < len(segs) and j < segs[t][1] else (0, 0)
                 for segs in rows], latent=True)
        starts = [segs[t][0] + segs[t][1] if t < len(segs) else starts[r] for r, segs in enumerate(rows)]
    return calls, physical.to(device)


def text_ce(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of next-token prediction from the hidden states; the head runs on trained positions only."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[keep])


def _ordinary_embed_norm(embeds: torch.Tensor, batch, latent_mask: torch.Tensor) -> float:
    """Mean norm of the text-token embeddings (no image features, no pads, no padding)."""
    keep = ~latent_mask & ~batch["mm_token_type_ids"].bool()
    if "attention_mask" in batch:
        keep &= batch["attention_mask"].bool()
    return float(embeds.detach()[keep].norm(dim=-1).mean()) if keep.any() else 0.0


def _pad_mask(shape, rows: list[list[tuple[int, int]]], device) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for r, segs in enumerate(rows):
        for first, k in segs:
            mask[r, first:first + k] = True
    return mask


class _CallCache:
    """The KV cache of a stage-2 forward as plain tensors: per layer, the keys / values each decoder call
    added. `checkpointed(...)` runs one call under activation checkpointing with a DynamicCache rebuilt
    from those tensors inside the checkpointed function, so the recomputation in backward sees exactly
    the cache of the first run (a DynamicCache shared across calls would already hold later entries,
    and transformers' own per-layer checkpointing drops the cache altogether)."""

    def __init__(self, model):
        self.config = model.model.language_model.config
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(self.config.num_hidden_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(self.config.num_hidden_layers)]

    def checkpointed(self, model, x, positions, seen):
        from torch.utils.checkpoint import checkpoint

        layers, n = len(self.keys), x.shape[1]
        past = [tuple(t) for layer in range(layers) for t in (self.keys[layer], self.values[layer])]  # snapshots

        def call(x, positions, seen, *past_lists):
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
            for layer in range(layers):
                ks, vs = past_lists[2 * layer], past_lists[2 * layer + 1]
                if ks:
                    cache.update(torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), layer)
            hidden, cache = run_decoder(model, x, positions, seen, cache, use_cache=True)
            new = [t[..., -n:, :] for layer in cache.layers for t in (layer.keys, layer.values)]
            return (hidden, *new)

        hidden, *new = checkpoint(call, x, positions, seen, *past, use_reentrant=False)
        for layer in range(layers):
            self.keys[layer].append(new[2 * layer])
            self.values[layer].append(new[2 * layer + 1])
        return hidden


def stage2_loss(model, batch: dict, always_run_vision: bool = False, min_segments: int = 0,
                min_steps: int = 0, latent_norm: "float | None" = None,
                checkpoint_calls: bool = False) -> Stage2Output:
    """Stage-2 CE with the latents fed back through a KV cache: (S_max + 1) chunk calls + sum_t K_t steps.

    Under ZeRO-3 pass the largest segment count of any rank as `min_segments` and K as
    `min_steps` (and `always_run_vision=True`): every rank then makes the same calls.
    `latent_norm` (model.latent_rescale): fed-back states are rescaled to that norm.
    `checkpoint_calls`: activation checkpointing per decoder call (stage 2's form of
    model.gradient_checkpointing): only each call's inputs and its new keys / values are kept;
    the rest is recomputed in backward. Loss and gradients are those of the plain run.
    """
    from transformers import DynamicCache

    _check_batch(model, batch, uses_cache=True)
    lengths, rows = _segments_per_row(batch)
    embeds = embed_tokens(model, batch, always_run_vision=always_run_vision)
    if checkpoint_calls and not torch.is_grad_enabled():
        checkpoint_calls = False  # nothing to save memory for
    positions, _ = rope_positions(model, batch)
    n_rows, device = embeds.shape[0], embeds.device
    plan, physical = _lockstep_plan(lengths, rows, embeds.shape[1], device, min_segments, min_steps)

    cache = DynamicCache(config=model.model.language_model.config)
    call_cache = _CallCache(model) if checkpoint_calls else None
    seen = torch.zeros(n_rows, 0, dtype=torch.bool, device=device)  # live slots of the cache so far
    rows_col, rows_flat = torch.arange(n_rows, device=device).unsqueeze(1), torch.arange(n_rows, device=device)
    outputs, fed_norm_sum, last = [], embeds.new_zeros(()), None
    fed_sum = embeds.new_zeros(embeds.shape[-1], dtype=torch.float32)
    for call in plan:
        if call.latent:
            fed = rescale(last, latent_norm)
            x = fed.unsqueeze(1)
            live = call.live[:, 0]
            fed_norm_sum = fed_norm_sum + (last.detach().norm(dim=-1) * live).sum()
            fed_sum = fed_sum + (fed.detach().float() * live[:, None]).sum(0)
        else:
            x = embeds[rows_col, call.index]
        seen = torch.cat([seen, call.live], dim=1)
        if call_cache is not None:
            hidden = call_cache.checkpointed(model, x, positions[:, rows_col, call.index], seen)
        else:
            hidden, cache = run_decoder(model, x, positions[:, rows_col, call.index], seen, cache, use_cache=True)
        outputs.append(hidden)
        # the state each row feeds next: its output at its last live slot in this call, if it had one
        newest = hidden[rows_flat, call.newest]
        last = newest if last is None else torch.where(call.live.any(1, keepdim=True), newest, last)

    in_order = torch.cat(outputs, dim=1).gather(1, physical.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    ce = text_ce(model, in_order, batch["labels"])
    n_fed = sum(k for segs in rows for _, k in segs)
    stats = {
        "latent_fed_norm": float(fed_norm_sum) / max(n_fed, 1),
        "token_embed_norm": _ordinary_embed_norm(embeds, batch, _pad_mask(physical.shape, rows, device)),
        "latent_steps": float(n_fed),
        "decoder_calls": float(len(plan)),
        "fed_sum": fed_sum,
        "fed_count": n_fed,
    }
    return Stage2Output(loss=ce, ce=ce, stats=stats)


def naive_stage2_loss(model, batch: dict, always_run_vision: bool = False,
                      latent_norm: "float | None" = None) -> Stage2Output:
    """Reference: for the i-th pad of every row in turn, re-run the whole sequence (no cache) and write the
    hidden state at the position before it into that pad; then one last pass for CE. n_max + 1 full passes."""
    _check_batch(model, batch, uses_cache=False)
    _, rows = _segments_per_row(batch)
    embeds = embed_tokens(model, batch, always_run_vision=always_run_vision)
    positions, _ = rope_positions(model, batch)
    mask = batch.get("attention_mask")
    pads = [[first + j for first, k in segs for j in range(k)] for segs in rows]
    x, fed_norms = embeds, []
    for i in range(max((len(p) for p in pads), default=0)):
        hidden, _ = run_decoder(model, x, positions, mask)
        r = torch.tensor([b for b, p in enumerate(pads) if i < len(p)], device=x.device)
        c = torch.tensor([p[i] for p in pads if i < len(p)], device=x.device)
        fed = hidden[r, c - 1]
        fed_norms.append(fed.detach().norm(dim=-1))
        x = x.index_put((r, c), rescale(fed, latent_norm))
    hidden, _ = run_decoder(model, x, positions, mask)
    ce = text_ce(model, hidden, batch["labels"])
    fed = torch.cat(fed_norms) if fed_norms else embeds.new_zeros(0)
    stats = {
        "latent_fed_norm": float(fed.mean()) if fed.numel() else 0.0,
        "token_embed_norm": _ordinary_embed_norm(embeds, batch, _pad_mask(embeds.shape[:2], rows, embeds.device)),
        "latent_steps": float(fed.numel()),
        "decoder_calls": float(len(fed_norms) + 1),
    }
    return Stage2Output(loss=ce, ce=ce, stats=stats)
