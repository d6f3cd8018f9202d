"""One Record -> the token ids, labels and pixels the model trains on (layout: ILVR_METHOD.md).

The prompt (system + user turn with the input images + assistant header) is built by the
processor itself, so image placeholders are expanded exactly as the model expects. The
assistant turn is assembled token by token: a text step is its tokens, a latent step is
`<|latent_start|>` + K x `<|latent_pad|>` + `<|latent_end|>`, and the turn closes with
`<|im_end|>` + "\\n" as the chat template closes it.

Labels are aligned with input_ids (the model shifts them): trained are the text tokens,
the `<|latent_start|>` marker and the closing `<|im_end|>`; -100 elsewhere (prompt, image
tokens, latent pads, `<|latent_end|>` (generation forces it after K pads), and the "\\n"
after `<|im_end|>`, which generation never reaches).
Helper images (one per latent step) go through the same image processor but are kept
apart: the student never sees them as tokens; only the teacher encodes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipeline.latent_tokens import LatentTokenIds
from data_pipeline.limits import MAX_IMAGE_PIXELS
from data_pipeline.records import IMAGE_PLACEHOLDER, Record, RecordError, decode_image, with_image_placeholders

IGNORE_INDEX = -100
IM_END = "<|im_end|>"


@dataclass
class EncodedPrompt:
    """The prompt alone, ending with the assistant header (for evaluation and generation)."""

    id: str
    input_ids: torch.Tensor  # [T] long
    mm_token_type_ids: torch.Tensor  # [T] long, 1 on image tokens
    pixel_values: torch.Tensor  # [patches, C*temporal*patch*patch] float
    image_grid_thw: torch.Tensor  # [n_images, 3] long


@dataclass
class EncodedSample:
    """One training sequence. `latent_segments[s] = (index of the first pad, K)`; segment s
    is taught from helper image s (`helper_image_grid_thw[s]`)."""

    id: str
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, -100 where not trained
    mm_token_type_ids: torch.Tensor  # [T] long
    pixel_values: torch.Tensor  # [patches, D] float
    image_grid_thw: torch.Tensor  # [n_images, 3] long
    helper_pixel_values: torch.Tensor  # [helper patches, D] float
    helper_image_grid_thw: torch.Tensor  # [n_segments, 3] long
    latent_segments: torch.Tensor  # [n_segments, 2] long: (first pad index, K)
    prompt_length: int

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @property
    def num_helpers(self) -> int:
        return int(self.helper_image_grid_thw.shape[0])


def patch_dim(image_processor) -> int:
    """Width of one row of pixel_values: channels x temporal patch x patch x patch."""
    return 3 * image_processor.temporal_patch_size * image_processor.patch_size**2


def user_content(question: str, num_images: int) -> list[dict]:
    """The user turn as chat content: text pieces and one image entry per placeholder, in order."""
    pieces = with_image_placeholders(question, num_images).split(IMAGE_PLACEHOLDER)
    content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def _control_tokens(tokenizer) -> set[str]:
    return {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}


def _process_images(image_processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) for PIL images; empty tensors with the right widths for none."""
    if not images:
        return torch.zeros(0, patch_dim(image_processor)), torch.zeros(0, 3, dtype=torch.long)
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"].to(torch.long)


def _process_helpers(image_processor, record: Record, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The helper images' (pixel_values, image_grid_thw), decoded and processed one at a time.

    The processor treats each image on its own, so this equals one batched call; but
    only one full-size decoded helper is alive at a time, not all of a sample's.
    """
    parts = [_process_images(image_processor, [decode_image(ref.load(), max_pixels)])
             for ref in record.helper_images]
    if not parts:
        return _process_images(image_processor, [])
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


def encode_prompt(record: Record, processor, max_image_pixels: int = MAX_IMAGE_PIXELS) -> EncodedPrompt:
    """Tokenize the system + user turn with the input images, ending with "<|im_start|>assistant\\n".

    An image over `max_image_pixels` (judged from its header, before decoding) is "too_large".
    """
    tokenizer = processor.tokenizer
    found = [t for t in _control_tokens(tokenizer) if t in record.question]
    if found:
        raise RecordError("malformed_record", f"record {record.id!r}: question contains control tokens {found}")
    images = [decode_image(ref.load(), max_image_pixels) for ref in record.images]
    messages = [{"role": "user", "content": user_content(record.question, len(images))}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=images or None, return_tensors="pt")
    input_ids = batch["input_ids"][0].to(torch.long)
    if images:
        pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"].to(torch.long)
    else:
        pixel_values, grid = _process_images(processor.image_processor, [])
    is_image = input_ids == processor.image_token_id
    expected = int((grid.prod(-1) // processor.image_processor.merge_size**2).sum())
    if int(is_image.sum()) != expected:
        message = f"record {record.id!r}: {int(is_image.sum())} image tokens, the grids say {expected}"
        raise RecordError("malformed_record", message)
    return EncodedPrompt(record.id, input_ids, is_image.to(torch.long), pixel_values, grid)


def assistant_tokens(record: Record, tokenizer, latent_ids: LatentTokenIds, latent_size: int):
    """(ids, labels, first-pad offsets within the turn) for the steps plus the closing <|im_end|>\\n."""
    ids: list[int] = []
    labels: list[int] = []
    pad_offsets: list[int] = []
    for step in record.steps:
        if step.kind == "text":
            # split_special_tokens: a literal "<|latent_start|>" in the text stays text
            tokens = tokenizer(step.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids += tokens
            labels += tokens
        elif step.kind == "latent":
            if step.image is None:
                raise RecordError("missing_image", f"record {record.id!r}: latent step without a helper image")
            pad_offsets.append(len(ids) + 1)
            ids += [latent_ids.start] + [latent_ids.pad] * latent_size + [latent_ids.end]
            # <|latent_start|> is trained (the model decides when to open a segment); the pads and
            # <|latent_end|> are not: generation feeds K states and then forces the end marker
            labels += [latent_ids.start] + [IGNORE_INDEX] * (latent_size + 1)
        else:
            raise RecordError("malformed_record", f"record {record.id!r}: unknown step kind {step.kind!r}")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids += [im_end] + newline
    labels += [im_end] + [IGNORE_INDEX] * len(newline)
    return ids, labels, pad_offsets


def encode_record(
    record: Record, processor, latent_ids: LatentTokenIds, latent_size: int, max_length: int,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> EncodedSample:
    """Encode a training record. Raises RecordError: no_target, too_long, corrupt_image, too_large, ..."""
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    if not record.steps:
        raise RecordError("no_target", f"record {record.id!r} has no steps (evaluation-only row)")
    prompt = encode_prompt(record, processor, max_image_pixels)
    ids, labels, pad_offsets = assistant_tokens(record, processor.tokenizer, latent_ids, latent_size)
    start = prompt.input_ids.numel()
    length = start + len(ids)
    if length > max_length:
        raise RecordError("too_long", f"record {record.id!r} is {length} tokens > max_length {max_length}")
    helper_pixels, helper_grid = _process_helpers(processor.image_processor, record, max_image_pixels)
    assistant = torch.tensor(ids, dtype=torch.long)
    return EncodedSample(
        id=record.id,
        input_ids=torch.cat([prompt.input_ids, assistant]),
        labels=torch.cat([torch.full((start,), IGNORE_INDEX, dtype=torch.long), torch.tensor(labels)]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros_like(assistant)]),
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
        helper_pixel_values=helper_pixels,
        helper_image_grid_thw=helper_grid,
        latent_segments=torch.tensor([[start + o, latent_size] for o in pad_offsets], dtype=torch.long).view(-1, 2),
        prompt_length=int(start),
    )
