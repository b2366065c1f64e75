"""Text tokenizers: the checkpoint's own tokenizer files (transformers), or UTF-8 bytes for tiny test configs.

Both have `encode(text) -> ids` (no special tokens added) and `decode(ids) -> text` (special tokens skipped).
Special tokens, image codes and speech codes never go through them: callers place those by id arithmetic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

from omnidiff_jax.vocab import TokenLayout


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, modulo the text vocabulary: the text tokenizer of tiny configs (ASCII text
    round-trips when the layout has at least 128 text ids)."""

    def __init__(self, num_text: int):
        self.num_text = num_text

    def encode(self, text: str) -> list[int]:
        return [b % self.num_text for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= i < min(self.num_text, 256)).decode("utf-8", errors="replace")


class HFTokenizer:
    """The checkpoint's tokenizer files (Qwen2 byte-level BPE plus the Omni specials), via transformers.

    Checks that the files agree with the model's token layout on the ids that prompts place directly."""

    def __init__(self, path: str | os.PathLike, layout: TokenLayout):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        for name, want in (("<|im_start|>", layout.im_start), ("<|im_end|>", layout.im_end),
                           ("<|endoftext|>", layout.eos), ("<|audio|>", layout.audio_tag)):
            got = self.tokenizer.convert_tokens_to_ids(name)
            if got != want:
                raise ValueError(f"{path}: tokenizer maps {name} to {got}, but the model's token layout has {want}")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_text_tokenizer(spec: str | os.PathLike, layout: TokenLayout) -> TextTokenizer:
    """'bytes' for `ByteTokenizer`, else the path of a folder with tokenizer files."""
    if str(spec) == "bytes":
        return ByteTokenizer(layout.num_text)
    if not Path(spec).is_dir():
        raise ValueError(f"text tokenizer {str(spec)!r}: expected 'bytes' or a folder with tokenizer files")
    return HFTokenizer(spec, layout)
