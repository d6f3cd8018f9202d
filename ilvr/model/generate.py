"""Latent decoding: text tokens, and K fed-back hidden states after each `<|latent_start|>`.

Stock `generate` cannot feed a hidden state back as the next input, so the loop is written
here on the shared input path (`embed_tokens`, `rope_positions`, `run_decoder`, `lm_head`)
with a transformers `DynamicCache`. Per sample, a small state machine runs:

    text --(samples <|latent_start|>)--> K latent steps --(forced <|latent_end|>)--> text

In a latent step the input embedding is the sample's own final hidden state (after the last
norm) at the previous position; the id recorded there is `<|latent_pad|>`. Pad and end are
never sampled freely (their logits are masked), so every complete segment is exactly
start + K pads + end. Prompts are LEFT padded; new positions follow stock Qwen-VL generation:
text position (valid tokens so far) + the per-sample `rope_deltas` of the prompt.

Ablations (do the latents' contents matter?), both at the scale of real fed-back states:
- "constant-latent": every latent input is one constant vector: the dataset-mean fed-back
  state recorded in training (`ilvr_settings.json`: `fed_mean`), else the mean of the
  states this batch feeds back in latent mode (a calibration pass);
- "shuffled-latent": sample b's latent inputs are those that sample b+1 of the batch (mod B)
  fed back in latent mode (a calibration pass): real latents of the wrong map.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from data_pipeline.encode import IM_END
from data_pipeline.latent_tokens import LatentTokenIds
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.latent_scale import rescale

MODES = ("latent", "text", "constant-latent", "shuffled-latent")
LATENT_MARKER = "<latent>"  # stands for one latent segment in GenerationResult.text


@dataclass
class GenerationResult:
    """One sample's answer.

    `token_ids` are the generated ids (latent start/pad/end included at their places, eos
    included when reached). `latent_segments[s] = (index of the first pad in token_ids,
    number of pads)`; the number is K except for a segment cut by max_new_tokens. `text` is
    the decoded answer without special tokens, each latent segment written as LATENT_MARKER.
    """

    id: str
    text: str
    token_ids: list[int]
    latent_segments: list[tuple[int, int]] = field(default_factory=list)
    finished: bool = False
    latent_inputs: "torch.Tensor | None" = None  # [n, H]: the vectors fed at its latent pads (record_latents)

    @property
    def num_latent_segments(self) -> int:
        return len(self.latent_segments)


def left_pad_prompts(prompts, pad_token_id: int, device) -> dict:
    """EncodedPrompts as one left-padded batch (so every row's last prompt token is at -1)."""
    t_max = max(int(p.input_ids.numel()) for p in prompts)
    input_ids = torch.full((len(prompts), t_max), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), t_max), dtype=torch.long)
    mm_token_type_ids = torch.zeros((len(prompts), t_max), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = int(p.input_ids.numel())
        input_ids[row, t_max - n:] = p.input_ids
        attention_mask[row, t_max - n:] = 1
        mm_token_type_ids[row, t_max - n:] = p.mm_token_type_ids
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": torch.cat([p.pixel_values for p in prompts]),
        "image_grid_thw": torch.cat([p.image_grid_thw for p in prompts]),
    }  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's eos, <|im_end|>, and the model's generation eos ids."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return {int(i) for i in ids if i is not None and i != getattr(tokenizer, "unk_token_id", None)}


def pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy or temperature + nucleus sampling over [B, V] logits (already masked). [B] long."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before the token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_with_markers(token_ids: list[int], tokenizer, latent_ids: LatentTokenIds) -> str:
    """The generated text without special tokens, with LATENT_MARKER where each segment was."""
    pieces, run = [], []
    for t in token_ids:
        if t == latent_ids.start:
            pieces += [tokenizer.decode(run, skip_special_tokens=True), LATENT_MARKER]
            run = []
        elif t not in (latent_ids.pad, latent_ids.end):
            run.append(t)
    pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


class _Sample:
    """Decoding state of one row: its ids, segments, and where it is in the latent state machine."""

    def __init__(self):
        self.ids: list[int] = []
        self.segments: list[list[int]] = []
        self.latent_left = 0  # latent pads still to feed
        self.end_next = False  # <|latent_end|> is forced next
        self.finished = False
        self.fed: list[torch.Tensor] = []  # latent inputs, when recorded
        self.fed_count = 0  # latent inputs fed so far

    def step(self, proposed: int, latent_ids: LatentTokenIds, latent_size: int, stops: set[int]) -> int:
        """Record this step's id (the proposal, or the one the latent state forces) and return it."""
        if self.latent_left:
            token = latent_ids.pad
            self.segments[-1][1] += 1
            self.latent_left -= 1
            self.end_next = self.latent_left == 0
        elif self.end_next:
            token, self.end_next = latent_ids.end, False
        else:
            token = proposed
            if token == latent_ids.start:
                self.latent_left = latent_size
                self.segments.append([len(self.ids) + 1, 0])
            self.finished = token in stops
        self.ids.append(token)
        return token


def _latent_sources(model, prompts, tokenizer, latent_ids, latent_size, mode, constant_latent, kwargs):
    """(constant [H] or None, donors: per-row [n, H] or None) for the two ablation modes; runs a
    latent-mode calibration pass on the same prompts when what they need was not given."""
    if mode == "constant-latent" and constant_latent is not None:
        return constant_latent, None
    if mode == "shuffled-latent" and len(prompts) < 2:
        raise ValueError("mode 'shuffled-latent' needs a batch of >= 2 prompts (it feeds another sample's latents)")
    calibration = generate(model, prompts, tokenizer, latent_ids, latent_size, mode="latent", record_latents=True,
                           **kwargs)
    fed = [r.latent_inputs for r in calibration]
    if mode == "constant-latent":
        every = torch.cat([f for f in fed if f is not None and f.numel()] or [torch.zeros(0)])
        if every.numel() == 0:
            raise ValueError("constant-latent: the model opened no latent segment on this batch, so no fed-back "
                             "state to average; pass constant_latent (the export's fed_mean)")
        return every.mean(0), None
    return None, [fed[(b + 1) % len(fed)] for b in range(len(fed))]


@torch.no_grad()
def generate(model, prompts, tokenizer, latent_ids: LatentTokenIds, latent_size: int, *, mode: str = "latent",
             max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, constant_latent: torch.Tensor | None = None,
             use_cache: bool = True, latent_norm: float | None = None,
             record_latents: bool = False) -> list[GenerationResult]:
    """Decode answers for a batch of EncodedPrompts (each ending with the assistant header).

    mode: "latent" (ILVR inference), "text" (<|latent_start|> masked too: a text-only baseline),
    "constant-latent" (structure as "latent", every latent input is `constant_latent`, default
    the mean state this batch feeds back in latent mode), "shuffled-latent" (each sample is fed
    the latent states of the next sample of the batch). `latent_norm`: fed-back states are
    rescaled to this norm (the model.latent_rescale option; None = as produced).
    use_cache=False recomputes the whole sequence every step (slow; the reference for tests).
    The model is used as given (call .eval() first); a sample stops at an eos id or after
    max_new_tokens ids (latent pads count), and then feeds masked-out pad tokens.
    With `record_latents`, each result carries the vectors fed at its latent pads.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    if not prompts:
        return []
    embedding = model.get_input_embeddings()
    device, dtype = embedding.weight.device, embedding.weight.dtype
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    banned = [latent_ids.pad, latent_ids.end] + ([latent_ids.start] if mode == "text" else [])
    banned = torch.tensor(banned, device=device)
    constant, donors = None, None
    if mode in ("constant-latent", "shuffled-latent"):
        same = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    generator=generator, use_cache=use_cache, latent_norm=latent_norm)
        constant, donors = _latent_sources(model, prompts, tokenizer, latent_ids, latent_size, mode,
                                           constant_latent, same)
        if constant is not None:
            constant = constant.to(device=device, dtype=dtype).view(-1)

    batch = left_pad_prompts(prompts, pad_id, device)
    mask = batch["attention_mask"]
    pending_embeds = embed_tokens(model, batch)  # inputs the decoder has not seen yet
    pending_pos, deltas = rope_positions(model, batch)
    # stock generation: position of a new token = its text position (valid tokens before it) + rope_delta
    first_new_pos = mask.sum(1) + deltas.view(-1).to(device)  # [B]
    all_embeds, all_pos = pending_embeds, pending_pos
    cache = DynamicCache(config=model.config.get_text_config()) if use_cache else None
    samples = [_Sample() for _ in prompts]

    for step in range(max_new_tokens):
        if use_cache:
            hidden, cache = run_decoder(model, pending_embeds, pending_pos, mask, cache=cache, use_cache=True)
        else:
            hidden, _ = run_decoder(model, all_embeds, all_pos, mask)
        last = hidden[:, -1]  # [B, H]: final-norm state at each row's newest position
        logits = model.lm_head(last).float().index_fill(-1, banned, float("-inf"))  # out of place
        proposed = pick_tokens(logits, do_sample, temperature, top_p, generator).tolist()

        alive = [not s.finished for s in samples]
        tokens = [s.step(p, latent_ids, latent_size, stops) if a else pad_id
                  for s, p, a in zip(samples, proposed, alive)]
        if all(s.finished for s in samples) or step == max_new_tokens - 1:
            break
        new = embedding(torch.tensor(tokens, device=device))  # [B, H]
        is_latent = [a and t == latent_ids.pad for a, t in zip(alive, tokens)]
        fed_back = _fed_back(last, latent_norm, constant, donors, samples, is_latent)
        new = torch.where(torch.tensor(is_latent, device=device)[:, None], fed_back.to(new.dtype), new)
        if record_latents:
            for b in (b for b, latent in enumerate(is_latent) if latent):
                samples[b].fed.append(fed_back[b].float().cpu())
        for b in (b for b, latent in enumerate(is_latent) if latent):
            samples[b].fed_count += 1
        pending_embeds = new[:, None]
        pending_pos = (first_new_pos + step).view(1, -1, 1).expand(3, -1, -1)
        mask = torch.cat([mask, torch.tensor(alive, dtype=mask.dtype, device=device)[:, None]], dim=1)
        if not use_cache:
            all_embeds = torch.cat([all_embeds, pending_embeds], dim=1)
            all_pos = torch.cat([all_pos, pending_pos], dim=2)

    return [
        GenerationResult(id=p.id, text=decode_with_markers(s.ids, tokenizer, latent_ids), token_ids=s.ids,
                         latent_segments=[tuple(seg) for seg in s.segments], finished=s.finished,
                         latent_inputs=torch.stack(s.fed) if record_latents and s.fed else None)
        for p, s in zip(prompts, samples)
    ]


def _fed_back(last, latent_norm, constant, donors, samples, is_latent) -> torch.Tensor:
    """The next latent input of every row [B, H]: its own (rescaled) state, the constant, or its donor's
    n-th latent (n = latents it was fed so far; the donor's list is cycled; its own state if it has none)."""
    if constant is not None:
        return constant.expand_as(last)
    own = rescale(last, latent_norm)
    if donors is None:
        return own
    rows = []
    for b, latent in enumerate(is_latent):
        donor = donors[b]
        if latent and donor is not None and donor.shape[0]:
            n = samples[b].fed_count
            rows.append(donor[n % donor.shape[0]].to(own.device, own.dtype))
        else:
            rows.append(own[b])
    return torch.stack(rows)
