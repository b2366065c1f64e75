"""Adaptive generation lengths for ASR and TTS, as the reference's evaluation scripts set them (Omni-Diffusion
`tools/evaluate_asr.py`, `tools/evaluate_libritts.py`). `tools/inference.py` does not use them (it runs 50 tokens in 25
steps).

    ASR (evaluate_asr.py):      N = int(0.2 * P)      steps = int(N / 2)   one block of N, entropy
    TTS (evaluate_libritts.py): N = int(3.5 * T_text) steps = N // 2       entropy-penalty, repeat penalty 1.2

P is the whole prompt length after the speech placeholders are expanded; T_text is the number of tokens of the
text to speak (tokenized without BOS). Both use temperature 0 and top-p 0.9 with no CFG. Each function returns
keyword arguments for `omnidiff_jax.sampler.sample`.
"""

from __future__ import annotations

TTS_PREFIX = "Convert the text to speech.\n"


def asr(prompt_length: int) -> dict:
    """Sampler settings for a speech-recognition prompt of `prompt_length` tokens."""
    gen_length = int(0.2 * prompt_length)
    if gen_length < 2:
        raise ValueError(f"prompt_length {prompt_length} is too short for an ASR prompt (it gives {gen_length} "
                         "generated tokens and no step; a real one is about T_lfr + 20 tokens)")
    return dict(gen_length=gen_length, steps=int(gen_length / 2), block_size=gen_length, alg="entropy",
                temperature=0.0, top_p=0.9)


def tts(text_tokens: int) -> dict:
    """Sampler settings for speaking a text of `text_tokens` tokens (count them on `tts_text(content)`)."""
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1, got {text_tokens}")
    gen_length = int(3.5 * text_tokens)
    return dict(gen_length=gen_length, steps=gen_length // 2, alg="entropy-penalty", repeat_penalty=1.2,
                temperature=0.0, top_p=0.9)


def tts_text(user_content: str) -> str:
    """The text whose tokens set the TTS length: the user content without the task prefix, stripped."""
    return user_content.replace(TTS_PREFIX, "").strip()
