"""The token id layout of Omni-Diffusion's single vocabulary, and helpers to build and classify ids.

Layout (Omni-Diffusion `omni_diffusion/tokenizer.py` `update_tokenizer`, then `update_tokenizer_for_magvitv2` in
`tools/finetune_dream_v4_51_3.py`), for the released model:

    [0, 151643)            text BPE tokens (Qwen2.5)
    [151643, 151667)       24 Dream specials: <|endoftext|> (eos = pad) ... <|mask|> = 151666
    [151667, 151688)       21 Omni specials: <|begin_of_image|> ... <|begin_of_audio|> = 151684 ... <|audio|> = 151687
    [151688, 168072)       16384 speech codes (GLM-4-Voice, 12.5 Hz): <|audio_k|> = 151688 + k
    [168072, 176264)       8192 image codes (MAGVIT-v2): <|image_k|> = 168072 + k

Tiny test configs keep the same order with fewer BPE tokens and codes, so every id below is an offset from
`num_text`. Nothing here tokenizes strings: image and speech codes are placed by id arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

DREAM_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|beginoftext|>", "<|mask|>",
)
OMNI_SPECIALS = (
    "<|begin_of_image|>", "<|end_of_image|>", "<|context_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|context_of_video|>", "<|begin_of_patch|>", "<|end_of_patch|>", "<|context_of_patch|>", "<|begin_of_quad|>",
    "<|end_of_quad|>", "<|begin_of_ref|>", "<|end_of_ref|>", "<|begin_of_box|>", "<|end_of_box|>", "<|image|>",
    "<|video|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|context_of_audio|>", "<|audio|>",
)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token lives. `TokenLayout()` is the released model's layout."""

    num_text: int = 151643  # BPE tokens before the first special
    num_audio_codes: int = 16384
    num_image_codes: int = 8192

    # ------------------------------------------------------------------ ranges
    @property
    def specials_start(self) -> int:
        return self.num_text

    @property
    def audio_code_start(self) -> int:
        return self.num_text + len(DREAM_SPECIALS) + len(OMNI_SPECIALS)

    @property
    def image_code_start(self) -> int:
        return self.audio_code_start + self.num_audio_codes

    @property
    def vocab_size(self) -> int:
        return self.image_code_start + self.num_image_codes

    # ------------------------------------------------------------------ named ids
    def special(self, token: str) -> int:
        """Id of a Dream or Omni special token, e.g. `special("<|mask|>")`."""
        if token in DREAM_SPECIALS:
            return self.num_text + DREAM_SPECIALS.index(token)
        if token in OMNI_SPECIALS:
            return self.num_text + len(DREAM_SPECIALS) + OMNI_SPECIALS.index(token)
        raise ValueError(f"unknown special token {token!r}")

    @property
    def eos(self) -> int:
        return self.special("<|endoftext|>")

    pad = eos

    @property
    def mask(self) -> int:
        return self.special("<|mask|>")

    @property
    def im_start(self) -> int:
        return self.special("<|im_start|>")

    @property
    def im_end(self) -> int:
        return self.special("<|im_end|>")

    @property
    def begin_of_audio(self) -> int:
        return self.special("<|begin_of_audio|>")

    @property
    def end_of_audio(self) -> int:
        return self.special("<|end_of_audio|>")

    @property
    def context_of_audio(self) -> int:
        return self.special("<|context_of_audio|>")

    @property
    def audio_tag(self) -> int:
        return self.special("<|audio|>")

    @property
    def begin_of_image(self) -> int:
        return self.special("<|begin_of_image|>")

    @property
    def end_of_image(self) -> int:
        return self.special("<|end_of_image|>")

    @property
    def image_tag(self) -> int:
        return self.special("<|image|>")

    # ------------------------------------------------------------------ codes <-> ids
    def audio_ids(self, codes: Iterable[int] | np.ndarray) -> np.ndarray:
        """Speech codes k -> token ids `audio_code_start + k`; raises on codes outside [0, num_audio_codes)."""
        return _codes_to_ids(codes, self.audio_code_start, self.num_audio_codes, "speech code")

    def image_ids(self, codes: Iterable[int] | np.ndarray) -> np.ndarray:
        """Image codes k -> token ids `image_code_start + k`; raises on codes outside [0, num_image_codes)."""
        return _codes_to_ids(codes, self.image_code_start, self.num_image_codes, "image code")

    def is_text(self, ids) -> np.ndarray:
        return np.asarray(ids) < self.num_text

    def is_special(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.num_text) & (ids < self.audio_code_start)

    def is_audio_code(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.audio_code_start) & (ids < self.image_code_start)

    def is_image_code(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.image_code_start) & (ids < self.vocab_size)

    def audio_codes(self, ids) -> np.ndarray:
        """The speech codes among `ids`, in order (other ids are skipped)."""
        ids = np.asarray(ids)
        return ids[self.is_audio_code(ids)] - self.audio_code_start

    def image_codes(self, ids) -> np.ndarray:
        """The image codes among `ids`, in order (other ids are skipped)."""
        ids = np.asarray(ids)
        return ids[self.is_image_code(ids)] - self.image_code_start

    def kind(self, token_id: int) -> str:
        """'text', 'special', 'audio', 'image' or raises for an id outside the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        if token_id < self.num_text:
            return "text"
        if token_id < self.audio_code_start:
            return "special"
        return "audio" if token_id < self.image_code_start else "image"


def _codes_to_ids(codes, start: int, count: int, what: str) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    bad = (codes < 0) | (codes >= count)
    if bad.any():
        raise ValueError(f"{what} {int(codes[bad][0])} is outside [0, {count})")
    return (codes + start).astype(np.int32)


OMNI_DIFFUSION = TokenLayout()
