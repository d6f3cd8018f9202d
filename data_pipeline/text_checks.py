"""The text checks of ilvr-prepare: rows that training would skip anyway are skipped and counted once, here.

Training skipped a question holding a control token (`<|im_end|>`, `<|latent_start|>`, ...) only
when it encoded it, so a dataset full of them passed prepare and failed the run later; and a
5 MB question was tokenized in full every epoch before it was skipped as too long. Prepare has no
tokenizer, so control tokens are recognised by their form: every special token of the Qwen2 /
Qwen2.5-VL tokenizers and the latent tokens is `<|name|>` (the encoder still checks the exact
set of the tokenizer it uses). Length is judged in characters, `MAX_TEXT_CHARS` by default: no
recipe's data.max_length (4096 tokens) comes near it, since a token is at least one character.
"""
from __future__ import annotations

import re

MAX_TEXT_CHARS = 1 << 20  # question + text steps of one record
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def check_text(record, max_chars: int = MAX_TEXT_CHARS) -> None:
    """Raise RecordError ("too_long", "control_token") for text training would skip."""
    from data_pipeline.records import RecordError

    chars = len(record.question) + sum(len(s.text) for s in record.steps if s.kind == "text")
    if chars > max_chars:
        raise RecordError("too_long", f"record {record.id!r}: its text is {chars} characters, more than "
                                      f"{max_chars} (MAX_TEXT_CHARS, data_pipeline/text_checks.py): longer than any data.max_length")
    found = sorted(set(CONTROL_TOKEN.findall(record.question)))
    if found:
        shown = ", ".join(found[:5]) + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
        raise RecordError("control_token", f"record {record.id!r}: the question holds control tokens {shown}; "
                                           "training would skip it")
