"""Qwen2.5-VL processors: a tiny one built offline for tests and CPU runs, and a loader for any.

No model may be downloaded, so tests and smoke runs use a processor built here: a small
byte-level BPE tokenizer trained on the project's own text, with Qwen2.5-VL's special
tokens and chat format, in the real transformers classes (`Qwen2Tokenizer`, the Qwen2-VL
image processor). The directory written is the one `Qwen2_5_VLProcessor.save_pretrained`
writes, so `AutoProcessor.from_pretrained` loads it wherever torchvision is installed.

Why a stand-in class: in transformers 5 every Qwen2-VL/2.5-VL processor needs a video
processor, which exists only with torchvision, and `ProcessorMixin` type-checks it, so
without torchvision neither `Qwen2_5_VLProcessor(...)` nor `AutoProcessor` works (they raise
ImportError). `ImageTextProcessor` then composes the same real tokenizer and image processor
and reproduces the one step of the processor that training uses: each `<|image_pad|>`
becomes `grid_t*grid_h*grid_w // merge_size**2` copies (as `replace_image_token` does).

Tiny image settings (defaults below): patch 14 and merge 2 as in Qwen2.5-VL, so one merged
token covers 28x28 px; min_pixels = 112*112 (16 tokens), max_pixels = 240*240. Square
maps: 192 px -> 196x196 = 49 tokens; 210..512+ px -> 224x224 = 64 tokens; other shapes
at most 73. Qwen2.5-VL's defaults (min 56*56, max 28*28*1280) give 384 px -> 392x392 = 196.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from data_pipeline.latent_tokens import LATENT_TOKENS, LatentTokenIds, add_latent_tokens

# Qwen2.5-VL's added tokens in id order; the last eight are ordinary (non-special) added tokens.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PROCESSOR_CLASS = "Qwen2_5_VLProcessor"


def qwen_vl_chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """A Qwen2.5-VL-style chat template; "" leaves out the default system message.

    Written for this project; with the default it renders the same text as Qwen2.5-VL's
    own template for text/image/video content (no tools). Why "" exists: a model trained
    from scratch has no use for the system message, and its ~20 tiny-BPE tokens push the
    image away from the sequence start, where a from-scratch model can tell image tokens
    apart by their causal prefix (docs/method.md, "What a from-scratch model needs").
    """
    if "{" in system_prompt or "}" in system_prompt:
        raise ValueError(f"system_prompt={system_prompt!r}: braces would be read as template syntax")
    default = ("{% if loop.first and message['role'] != 'system' %}"
               "<|im_start|>system\n" + system_prompt + "<|im_end|>\n{% endif %}") if system_prompt else ""
    return "{% for message in messages %}" + default + _MESSAGES_TEMPLATE


# One line on purpose: no stray whitespace.
_MESSAGES_TEMPLATE = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_CHAT_TEMPLATE = qwen_vl_chat_template()

TINY_PATCH_SIZE = 14
TINY_MIN_PIXELS = 112 * 112
TINY_MAX_PIXELS = 240 * 240


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


class ImageTextProcessor:
    """The part of `Qwen2_5_VLProcessor` that encoding needs, for environments without torchvision.

    Same call contract: `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`
    and `processor(text=[...], images=[...], return_tensors="pt")` returning input_ids,
    attention_mask, mm_token_type_ids and, with images, pixel_values and image_grid_thw.
    """

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path), _read_template(path))

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, **kw):
        if tokenize:
            raise NotImplementedError("render with tokenize=False, then call the processor")
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt,
            tokenize=False, **kw,
        )  # fmt: skip

    def __call__(self, text, images=None, return_tensors: str = "pt"):
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            out = dict(self.image_processor(images=list(images), return_tensors=return_tensors))
            counts = (out["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
            texts = expand_placeholders(texts, self.image_token, counts)
        elif any(self.image_token in t for t in texts):
            raise ValueError(f"text has {self.image_token} placeholders but no images were given")
        tokens = self.tokenizer(texts, padding=True, return_tensors=return_tensors)
        out.update(tokens)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).to(torch.long)
        return out

    def save_pretrained(self, out_dir: str) -> None:
        """Write the directory `Qwen2_5_VLProcessor.save_pretrained` writes (transformers 5 layout)."""
        os.makedirs(out_dir, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        image_cfg = self.image_processor.to_dict()
        image_cfg.pop("processor_class", None)
        keep = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")  # fmt: skip
        video_cfg = {k: image_cfg[k] for k in keep if k in image_cfg}
        video_cfg["video_processor_type"] = "Qwen2VLVideoProcessor"
        config = {"image_processor": image_cfg, "processor_class": PROCESSOR_CLASS, "video_processor": video_cfg}
        with open(os.path.join(out_dir, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(self.chat_template)


def expand_placeholders(texts: list[str], token: str, counts: list[int]) -> list[str]:
    """Replace the i-th `token` over all texts by `counts[i]` copies of it."""
    if sum(t.count(token) for t in texts) != len(counts):
        raise ValueError(f"{sum(t.count(token) for t in texts)} {token} placeholders for {len(counts)} images")
    remaining = iter(counts)
    expanded = []
    for text in texts:
        first, *rest = text.split(token)
        expanded.append(first + "".join(token * next(remaining) + piece for piece in rest))
    return expanded


def _read_template(path: str) -> str | None:
    """The processor chat template of a saved dir: chat_template.jinja (transformers 5) or .json (4.x)."""
    jinja, js = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    if os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


def _train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with Qwen2's pre-tokenizer; return (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_tiny_processor(
    out_dir: str,
    texts: Iterable[str],
    vocab_size: int = 1024,
    patch_size: int = TINY_PATCH_SIZE,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """Train and save a small Qwen2.5-VL-style processor (with latent tokens) in `out_dir`.

    `vocab_size` counts every token, added ones included; a small corpus may give fewer
    (BPE stops when nothing is left to merge). Returns `out_dir`.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    n_added = len(QWEN_SPECIAL_TOKENS) + len(QWEN_PLAIN_ADDED_TOKENS) + len(LATENT_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size must be at least {256 + n_added} (256 bytes + {n_added} added tokens)")
    vocab, merges = _train_bpe(texts, vocab_size - n_added)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED_TOKENS])
    add_latent_tokens(tokenizer)
    template = qwen_vl_chat_template(system_prompt)
    tokenizer.chat_template = template
    pixels = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                  min_pixels=min_pixels, max_pixels=max_pixels)  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(**pixels)
    if torchvision_available():
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=template,
        )  # fmt: skip
    else:
        processor = ImageTextProcessor(tokenizer, image_processor, template)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def load_processor(path: str):
    """Load a Qwen2-VL / Qwen2.5-VL processor dir (real or tiny); add the latent tokens if missing.

    Returns (processor, LatentTokenIds). The real `AutoProcessor` result where torchvision is
    installed, else an `ImageTextProcessor` over the same tokenizer and image processor. If
    tokens were added, `len(processor.tokenizer)` grew: resize the model's embeddings to it.
    """
    if torchvision_available():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
    else:
        processor = ImageTextProcessor.from_pretrained(path)
    add_latent_tokens(processor.tokenizer)
    return processor, LatentTokenIds.from_tokenizer(processor.tokenizer)


def shard_texts(urls: list[str]) -> Iterable[str]:
    """The question and text steps of every record in the shards (JSON only, no image decoding)."""
    from data_pipeline.shard_reader import read_samples

    for url in urls:
        for sample in read_samples(url):
            if "json" not in sample:  # refused by the reader (see shard_reader), or malformed
                continue
            meta = json.loads(sample["json"])
            yield meta["question"].replace("<image>", " ")
            yield from (s["text"] for s in meta["steps"] if s.get("type") == "text")


def main(argv: list[str] | None = None) -> int:
    """`python -m data_pipeline.tiny_processor --shards DIR --out DIR`: train a tiny processor on shard text."""
    import argparse

    from data_pipeline.shards import expand_shards

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--shards", required=True, help="shards whose text trains the tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--patch-size", type=int, default=TINY_PATCH_SIZE,
                        help="vision patch side in px; a merged token covers (patch x merge)^2 px, e.g. 32 -> one "
                             "64 px VSP square per token")
    parser.add_argument("--min-pixels", type=int, default=TINY_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=TINY_MAX_PIXELS)
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help='the default system message; "" leaves it out (what a model trained from scratch wants)')
    args = parser.parse_args(argv)
    if not 0 < args.min_pixels <= args.max_pixels:
        parser.error(f"need 0 < --min-pixels <= --max-pixels, got {args.min_pixels} and {args.max_pixels}")
    out = build_tiny_processor(args.out, shard_texts(expand_shards(args.shards, must_exist=True)), args.vocab_size,
                               patch_size=args.patch_size, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                               system_prompt=args.system_prompt)
    print(f"tiny processor written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
