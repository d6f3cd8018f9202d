"""Record -> model tensors: layout of latent segments, labels token by token, images, errors."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.encode import IGNORE_INDEX, encode_prompt, encode_record, patch_dim
from data_pipeline.records import ImageRef, Record, RecordError, Step
from tests.factories import vsp_like_record, png_bytes

K = 4


def encode(tiny, record, max_length=4096):
    processor, latent = tiny
    return encode_record(record, processor, latent, latent_size=K, max_length=max_length)


def test_three_latent_segments_of_k_pads(tiny):
    latent = tiny[1]
    sample = encode(tiny, vsp_like_record(n_images=2, n_latent=3))
    ids = sample.input_ids.tolist()
    assert sample.latent_segments.shape == (3, 2) and (sample.latent_segments[:, 1] == K).all()
    pads = [i for i, t in enumerate(ids) if t == latent.pad]
    assert pads == [p + j for p, k in sample.latent_segments.tolist() for j in range(k)]  # in order, nothing else
    for first_pad, k in sample.latent_segments.tolist():
        assert ids[first_pad - 1] == latent.start
        assert ids[first_pad : first_pad + k] == [latent.pad] * k
        assert ids[first_pad + k] == latent.end
    assert ids.count(latent.pad) == 3 * K and ids.count(latent.start) == 3 and ids.count(latent.end) == 3
    assert sample.helper_image_grid_thw.shape == (3, 3)
    helper_patches = int(sample.helper_image_grid_thw.prod(-1).sum())
    assert sample.helper_pixel_values.shape == (helper_patches, patch_dim(tiny[0].image_processor))


def test_labels_token_by_token(tiny):
    processor, latent = tiny
    tokenizer = processor.tokenizer
    sample = encode(tiny, vsp_like_record())
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert ids[-1 - len(newline)] == im_end and ids[len(ids) - len(newline) :] == newline
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        if i < sample.prompt_length:
            assert lab == IGNORE_INDEX, f"prompt token {i} is trained"
        elif tok == latent.pad:
            assert lab == IGNORE_INDEX, f"latent pad {i} is trained"
        elif tok == latent.end:  # generation forces it after K pads: never trained
            assert lab == IGNORE_INDEX, f"<|latent_end|> {i} is trained"
        elif i >= len(ids) - len(newline):
            assert lab == IGNORE_INDEX, "the newline after <|im_end|> is trained"
        else:  # text, <|latent_start|> (when to open a segment is learned), closing <|im_end|>
            assert lab == tok, f"assistant token {i} ({tok}) is not trained"
    assert labels.count(latent.start) == ids.count(latent.start) == 3
    assert not any(lab != IGNORE_INDEX for tok, lab in zip(ids, labels) if tok == processor.image_token_id)
    assert tokenizer.decode(ids[: sample.prompt_length]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_labelled_text_decodes_to_the_assistant_text(tiny):
    processor, latent = tiny
    record = vsp_like_record()
    sample = encode(tiny, record)
    markers = {latent.start, latent.end, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    pairs = zip(sample.input_ids.tolist(), sample.labels.tolist())
    text_ids = [t for t, lab in pairs if lab != IGNORE_INDEX and t not in markers]
    assert processor.tokenizer.decode(text_ids) == "".join(s.text for s in record.steps if s.kind == "text")


def test_image_tokens_match_the_grids(tiny):
    processor = tiny[0]
    sample = encode(tiny, vsp_like_record(n_images=2, sizes=(192, 384)))
    merge = processor.image_processor.merge_size
    assert sample.image_grid_thw.shape == (2, 3)
    per_image = (sample.image_grid_thw.prod(-1) // merge**2).tolist()
    assert per_image == [49, 64]
    is_image = sample.input_ids == processor.image_token_id
    assert int(is_image.sum()) == sum(per_image)
    assert torch.equal(sample.mm_token_type_ids, is_image.long())
    patches = int(sample.image_grid_thw.prod(-1).sum())
    assert sample.pixel_values.shape == (patches, patch_dim(processor.image_processor))
    prompt = encode_prompt(vsp_like_record(), processor)
    assert torch.equal(prompt.input_ids, sample.input_ids[: sample.prompt_length])
    assert torch.equal(prompt.pixel_values, sample.pixel_values)


def test_text_only_record_matches_the_chat_template(tiny):
    """No images, no latents: the assembled ids equal the tokenized full conversation."""
    processor = tiny[0]
    record = Record(id="t", task="x", question="What is 2+2?", images=[], steps=[Step.of_text("It is 4.")])
    sample = encode(tiny, record)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is 4."}]}]  # fmt: skip
    full = processor.apply_chat_template(messages, tokenize=False)
    assert sample.input_ids.tolist() == processor.tokenizer(full, add_special_tokens=False)["input_ids"]
    assert sample.pixel_values.shape == (0, patch_dim(processor.image_processor))
    assert sample.image_grid_thw.shape == (0, 3) and sample.helper_image_grid_thw.shape == (0, 3)
    assert sample.helper_pixel_values.shape == (0, patch_dim(processor.image_processor))
    assert sample.latent_segments.shape == (0, 2)


def test_too_long_and_no_target(tiny):
    sample = encode(tiny, vsp_like_record())
    with pytest.raises(RecordError, match=str(sample.length)) as err:
        encode(tiny, vsp_like_record(), max_length=sample.length - 1)
    assert err.value.reason == "too_long"
    assert encode(tiny, vsp_like_record(), max_length=sample.length).length == sample.length
    record = vsp_like_record()
    record.steps = []
    with pytest.raises(RecordError) as err:
        encode(tiny, record)
    assert err.value.reason == "no_target"
    prompt = encode_prompt(record, tiny[0])  # evaluation rows still encode as prompts
    assert prompt.image_grid_thw.shape == (2, 3)


def test_bad_input_is_a_counted_record_error(tiny):
    record = vsp_like_record()
    record.images[0] = ImageRef(data=b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(RecordError) as err:
        encode(tiny, record)
    assert err.value.reason == "corrupt_image"
    record = vsp_like_record()
    record.question += " <|im_end|>"
    with pytest.raises(RecordError) as err:
        encode(tiny, record)
    assert err.value.reason == "malformed_record"


def test_literal_marker_in_text_stays_text(tiny):
    latent = tiny[1]
    record = Record(id="m", task="x", question="<image>Q", images=[ImageRef(data=png_bytes())],
                    steps=[Step.of_text("write <|latent_start|> here")])  # fmt: skip
    sample = encode(tiny, record)
    assert latent.start not in sample.input_ids.tolist()


def test_missing_placeholders_are_added_in_front(tiny):
    record = vsp_like_record(n_images=1)
    record.question = "No placeholder here."
    sample = encode(tiny, record)
    text = tiny[0].tokenizer.decode(sample.input_ids[: sample.prompt_length].tolist())
    assert "user\n<|vision_start|><|image_pad|>" in text and text.count("<|vision_start|>") == 1
