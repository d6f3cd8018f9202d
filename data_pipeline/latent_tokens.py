"""The three special tokens that frame a latent segment in the assistant turn.

A latent step is written as `<|latent_start|>` + K x `<|latent_pad|>` + `<|latent_end|>`.
Their ids depend on the tokenizer (they are appended after its vocabulary), so they are
always looked up, never hard-coded. They are the batch format's vocabulary, so they live with
the data pipeline; the model (ilvr/model/) uses them from here. This module imports nothing
heavy: data workers and the model both use it.
"""
from __future__ import annotations

from dataclasses import dataclass

LATENT_START = "<|latent_start|>"
LATENT_PAD = "<|latent_pad|>"
LATENT_END = "<|latent_end|>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as a single token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(token_id)


def add_latent_tokens(tokenizer) -> int:
    """Add the latent tokens the tokenizer lacks, as special tokens; return how many were added.

    A non-zero result means the model's embeddings must be resized to `len(tokenizer)`.
    `add_tokens(..., special_tokens=True)` is used (not `add_special_tokens`) because its
    signature is the same in transformers 4 and 5; the tokens are never split and are
    skipped by `decode(skip_special_tokens=True)`.
    """
    from tokenizers import AddedToken

    missing = [t for t in LATENT_TOKENS if _token_id(tokenizer, t) is None]
    if not missing:
        return 0
    return tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in missing],
        special_tokens=True,
    )


@dataclass(frozen=True)
class LatentTokenIds:
    """Ids of the latent tokens in one tokenizer."""

    start: int
    pad: int
    end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LatentTokenIds":
        ids = {}
        for name, token in zip(("start", "pad", "end"), LATENT_TOKENS):
            token_id = _token_id(tokenizer, token)
            if token_id is None:
                raise KeyError(
                    f"tokenizer has no {token!r} token; call data_pipeline.latent_tokens.add_latent_tokens(tokenizer) "
                    "(or load it with data_pipeline.tiny_processor.load_processor) and resize the model's "
                    "embeddings to len(tokenizer)"
                )
            ids[name] = token_id
        if len(set(ids.values())) != 3:
            raise ValueError(f"latent tokens must have three distinct ids, got {ids}")
        return cls(**ids)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.start, self.pad, self.end)
