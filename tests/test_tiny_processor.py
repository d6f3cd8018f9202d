"""The tiny offline processor and the latent tokens."""
from __future__ import annotations

import io
import json

import pytest

from data_pipeline.latent_tokens import LATENT_TOKENS, LatentTokenIds, add_latent_tokens
from data_pipeline.tiny_processor import (
    QWEN_SPECIAL_TOKENS,
    QWEN_VL_CHAT_TEMPLATE,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    ImageTextProcessor,
    build_tiny_processor,
    load_processor,
    qwen_vl_chat_template,
    torchvision_available,
)
from tests.factories import VSP_QUESTION, png_bytes

# ----------------------------------------------------------------------------- tests


def test_build_saves_a_qwen_processor_dir(tiny_processor_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2Tokenizer

    with open(f"{tiny_processor_dir}/processor_config.json") as f:
        config = json.load(f)
    assert config["processor_class"] == "Qwen2_5_VLProcessor"
    tokenizer = AutoTokenizer.from_pretrained(tiny_processor_dir)
    assert isinstance(tokenizer, Qwen2Tokenizer)
    assert len(tokenizer) <= 1024 and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    image_processor = AutoImageProcessor.from_pretrained(tiny_processor_dir)
    assert type(image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (
        TINY_MIN_PIXELS,
        TINY_MAX_PIXELS,
    )


NEEDS_TORCHVISION = "transformers 5 builds Qwen2.5-VL processors only with torchvision"


@pytest.mark.skipif(not torchvision_available(), reason=NEEDS_TORCHVISION)
def test_autoprocessor_loads_it_and_the_stand_in_matches(tiny_processor_dir):
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    real = AutoProcessor.from_pretrained(tiny_processor_dir)
    assert isinstance(real, Qwen2_5_VLProcessor)
    lite = ImageTextProcessor(real.tokenizer, real.image_processor, real.chat_template)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Plan."}]}]
    text = real.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert lite.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    image = Image.open(io.BytesIO(png_bytes(320)))
    a = real(text=[text], images=[image], return_tensors="pt")
    b = lite(text=[text], images=[image], return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert a[key].shape == b[key].shape and (a[key] == b[key]).all(), key


def test_special_and_latent_tokens_are_single_ids(tiny):
    processor, latent = tiny
    tokenizer = processor.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in QWEN_SPECIAL_TOKENS + LATENT_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    assert latent == LatentTokenIds(*(i[0] for i in ids[-3:]))
    assert add_latent_tokens(tokenizer) == 0  # already there: nothing added, no resize needed


def test_text_round_trips(tiny):
    tokenizer = tiny[0].tokenizer
    for text in ["Move L, then R!", "  two  spaces\nand\ttabs ", "unicode: héllo → 世界 ✓", VSP_QUESTION]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_chat_template_is_qwen_format(tiny):
    processor = tiny[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "text"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]  # fmt: skip
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


@pytest.mark.parametrize("size,tokens", [(100, 16), (192, 49), (256, 64), (384, 64), (512, 64)])
def test_tiny_image_token_budget(tiny, size, tokens):
    from PIL import Image

    processor = tiny[0]
    grid = processor.image_processor(images=[Image.new("RGB", (size, size))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // processor.image_processor.merge_size**2 == tokens


def test_latent_tokens_are_added_when_missing():
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab={"a": 0, "b": 1, "<|endoftext|>": 2}, merges=[])
    with pytest.raises(KeyError, match="latent_start.*add_latent_tokens"):
        LatentTokenIds.from_tokenizer(tokenizer)
    before = len(tokenizer)
    assert add_latent_tokens(tokenizer) == 3
    assert len(tokenizer) == before + 3
    ids = LatentTokenIds.from_tokenizer(tokenizer)
    assert tokenizer.decode([ids.start, ids.pad, ids.end], skip_special_tokens=True) == ""
    assert add_latent_tokens(tokenizer) == 0


def test_vocab_size_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_processor(str(tmp_path), ["x"], vocab_size=100)


def test_an_empty_system_prompt_leaves_the_default_system_message_out(tmp_path):
    """A from-scratch model wants the image near the sequence start: --system-prompt "" drops the default."""
    out = build_tiny_processor(str(tmp_path / "p"), ["some text", "more text"], system_prompt="")
    processor, _ = load_processor(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "text"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]  # an explicit one is kept
    assert processor.apply_chat_template(messages, tokenize=False).startswith("<|im_start|>system\nS<|im_end|>\n")
    assert qwen_vl_chat_template() == QWEN_VL_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="braces"):
        qwen_vl_chat_template("{{ oops }}")
