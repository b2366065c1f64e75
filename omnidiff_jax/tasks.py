"""The tasks: per-task presets, prompt construction and output parsing (Omni-Diffusion `tools/inference.py`).

Six tasks of the reference (t2i, s2i, vqa, svqa, tts, asr) and `text`, plain text generation from a prompt the
user writes (or gives as token ids, see `omnidiff_jax.request`). Prompts follow the reference chat template (Qwen2
ChatML with no default system message):

    [<|im_start|>system\n{system}<|im_end|>\n] <|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n

Text pieces go through the checkpoint's tokenizer; special tokens, image codes and audio placeholders are placed by
id arithmetic (`TokenLayout`), never by tokenising strings such as `<|image_12|>`. Splitting the string at
special tokens and tokenising the pieces gives the same ids as tokenising the whole string, since a tokenizer
never merges across an added special token.

`<|image|>` in user content becomes `<|begin_of_image|>` + image codes + `<|end_of_image|>`; `<|audio|>` becomes
`<|begin_of_audio|>` + `<|context_of_audio|>` x (T_lfr + 4) + `<|end_of_audio|>`, whose positions receive the
projected SenseVoice features. A prompt is a `sampler.Prompt`: its ids, and those features with their positions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from omnidiff_jax.sampler import Prompt
from omnidiff_jax.text_tokenizer import TextTokenizer
from omnidiff_jax.vocab import TokenLayout

TASKS = ("t2i", "s2i", "vqa", "svqa", "tts", "asr", "text")
OUTPUTS = ("text", "image", "speech")


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """Reference settings of one task (`tools/inference.py`); every field may be overridden per request."""

    system: str | None
    content: str  # user content template: {text} is the request text; <|image|>, <|audio|> are placeholders
    gen_length: int
    steps: int
    alg: str
    repeat_penalty: float = 1.0
    max_position_penalty: float = 1.0
    cfg_scale: float = 0.0  # classifier-free guidance scale (0 = off)
    boa_prefill: bool = False
    temperature: float = 0.0
    top_p: float | None = 0.9
    top_k: int | None = 50
    output: str = "text"  # what the task produces: one of OUTPUTS
    adaptive: str | None = None  # "asr" / "tts": the evaluation scripts' length rule (omnidiff_jax.adaptive_length)
    chat: bool = True  # wrap the content in the chat template; False: the content alone


PRESETS: dict[str, TaskPreset] = {
    "s2i": TaskPreset("Please generate an image based on the input audio.", "\n<|audio|>", 260, 260,
                      "entropy-penalty", 1.5, 2.0, cfg_scale=2.0, output="image"),
    "t2i": TaskPreset(None, "Generate an image based on the provided text description.\n{text}", 260, 260,
                      "entropy-penalty", 1.2, 2.0, output="image"),
    "svqa": TaskPreset("Please response the input audio based on the given image.", "<|audio|>\n<|image|>", 128,
                       128, "entropy-penalty", 1.2, 1.0, boa_prefill=True, output="speech"),
    "vqa": TaskPreset(None, "{text}\n<|image|>", 64, 64, "entropy"),
    "tts": TaskPreset(None, "Convert the text to speech.\n{text}", 50, 25, "entropy", output="speech"),
    "asr": TaskPreset(None, "Convert the speech to text.\n<|audio|>", 50, 25, "entropy"),
    "text": TaskPreset(None, "{text}", 128, 128, "entropy"),
}
INPUTS = {  # which request fields each task needs
    "t2i": ("text",), "s2i": ("audio",), "vqa": ("text", "image"), "svqa": ("audio", "image"), "tts": ("text",),
    "asr": ("audio",), "text": ("text",),
}

_SPLIT = re.compile(r"(<\|im_start\|>|<\|im_end\|>|<\|image\|>|<\|audio\|>)")


def build_prompt(tokenizer: TextTokenizer, layout: TokenLayout, *, content: str, system: str | None = None,
                 image_codes: Sequence[np.ndarray] = (), audio_embeds: Sequence[np.ndarray] = (),
                 chat: bool = True) -> Prompt:
    """Renders the chat template (or, with `chat=False`, the content alone) and tokenises it; placeholders are
    filled in order.

    image_codes: one code array per `<|image|>`. audio_embeds: one [T, hidden] array per `<|audio|>`, the projected
    speech features (T = T_lfr + 4): the placeholder gets T `<|context_of_audio|>` slots and the features land on
    them (`Prompt.embeds` [sum T, hidden], `Prompt.embed_positions` [sum T]).
    """
    n_img, n_aud = content.count("<|image|>"), content.count("<|audio|>")
    if n_img != len(image_codes):
        raise ValueError(f"the prompt has {n_img} <|image|> placeholder(s) but {len(image_codes)} image(s) were given")
    if n_aud != len(audio_embeds):
        raise ValueError(f"the prompt has {n_aud} <|audio|> placeholder(s) but {len(audio_embeds)} audio(s) were given")
    text = content
    if chat:
        text = (f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else "")
        text += f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    ids: list[int] = []
    positions: list[np.ndarray] = []
    images, audios = iter(image_codes), iter(audio_embeds)
    for piece in _SPLIT.split(text):
        if piece == "<|im_start|>":
            ids.append(layout.im_start)
        elif piece == "<|im_end|>":
            ids.append(layout.im_end)
        elif piece == "<|image|>":
            ids += [layout.begin_of_image, *layout.image_ids(np.asarray(next(images)).reshape(-1)),
                    layout.end_of_image]
        elif piece == "<|audio|>":
            n = len(next(audios))
            ids.append(layout.begin_of_audio)
            positions.append(np.arange(len(ids), len(ids) + n))
            ids += [layout.context_of_audio] * n
            ids.append(layout.end_of_audio)
        elif piece:
            ids += tokenizer.encode(piece)
    if not audio_embeds:
        return Prompt(np.asarray(ids, np.int32))
    return Prompt(np.asarray(ids, np.int32), np.concatenate([np.asarray(e) for e in audio_embeds]),
                  np.concatenate(positions))


def task_content(content: str, text: str | None) -> str:
    """A preset's content template with the request text in place of `{text}`."""
    if "{text}" in content and text is None:
        raise ValueError("the prompt needs a text input")
    return content.replace("{text}", text or "")


@dataclasses.dataclass
class ParsedOutput:
    """A generated region split as the reference does (`tools/inference.py`)."""

    text_ids: list[int]
    audio_codes: list[int]
    image_codes: list[int]


def split_output(ids: Sequence[int], layout: TokenLayout) -> ParsedOutput:
    """Audio codes, image codes and everything else (text, specials, leftover masks), in canvas order."""
    ids = np.asarray(ids)
    audio, image = layout.is_audio_code(ids), layout.is_image_code(ids)
    return ParsedOutput([int(i) for i in ids[~audio & ~image]], [int(c) for c in ids[audio] - layout.audio_code_start],
                        [int(c) for c in ids[image] - layout.image_code_start])


def fit_image_codes(codes: Sequence[int], count: int, num_codes: int) -> tuple[np.ndarray, str | None]:
    """The reference's repair of a generated image: repeat the last code up to `count`, keep the first `count`,
    clamp to [0, num_codes). Returns (codes, warning or None). No codes at all is an error for the caller."""
    codes = list(codes)
    if not codes:
        return np.zeros((0,), np.int32), f"no image codes were generated (expected {count})"
    warning = None
    if len(codes) < count:
        warning = f"{len(codes)} image codes generated, padded to {count} by repeating the last"
        codes = codes + [codes[-1]] * (count - len(codes))
    elif len(codes) > count:
        warning = f"{len(codes)} image codes generated, kept the first {count}"
        codes = codes[:count]
    return np.clip(np.asarray(codes, np.int32), 0, num_codes - 1), warning
