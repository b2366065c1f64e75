"""Reading and writing audio: soundfile decode, downmix to mono, the reference's resampler, validation.

The reference reads with torchaudio (float in [-1, 1]), downmixes with `mean(0)` for the speech encoder's input
(takes channel 0 for the GLM-4-Voice tokenizer) and resamples with torchaudio's
windowed-sinc `Resample` (sinc_interp_hann, width 6, rolloff 0.99); `resample` is that filter in NumPy (within
1e-6 of torchaudio's on the 24 kHz assets). A generic band-limited resampler such as soxr VHQ is within ~51 dB
SNR of it, but its different band edge shifts the top mel bins (above ~7 kHz) by up to ~0.6 nats on average
from the features the model was trained on, so we keep the reference's filter.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from omnidiff_jax.files import atomic_write


class AudioError(ValueError):
    """An audio file or waveform that cannot be used; the message names the file and the problem."""


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """Polyphase Hann-windowed sinc filters [new, 2·pad + orig] for rates reduced by their gcd, and pad."""
    width, rolloff = 6, 0.99  # torchaudio's defaults
    base = min(orig, new) * rolloff  # the lower rate x rolloff: the filter passes up to half of it
    pad = math.ceil(width * orig / base)
    t = (np.arange(-pad, pad + orig)[None, :] / orig - np.arange(new)[:, None] / new) * base
    t = np.clip(t, -width, width)
    window = np.cos(t * np.pi / width / 2) ** 2
    return np.sinc(t) * window * (base / orig), pad


def resample(wave: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """The reference's resampler (torchaudio `Resample` defaults: sinc_interp_hann, width 6, rolloff 0.99).

    A band-limited polyphase windowed-sinc filter with zero padding at both ends; output length
    ceil(N · target / sr). Float32 mono in, float32 out.
    """
    if sr == target_sr:
        return wave.astype(np.float32, copy=False)
    g = math.gcd(sr, target_sr)
    orig, new = sr // g, target_sr // g
    kernel, pad = _sinc_kernel(orig, new)
    x = np.pad(wave.astype(np.float64), (pad, pad + orig))
    frames = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[1])[::orig]  # [F, 2·pad + orig]
    out = (frames @ kernel.T).reshape(-1)  # phase-interleaved: [F · new]
    return out[:math.ceil(new * wave.size / orig)].astype(np.float32)


def load_audio(path: str | os.PathLike, target_sr: int | None = 16000,
               channel: int | None = None) -> tuple[np.ndarray, int]:
    """Reads `path` as float32 mono, resampled to `target_sr` (None keeps the file's rate).

    Integer samples are scaled to [-1, 1) by 2^(bits-1) (unsigned 8-bit centred first), float samples kept, as
    torchaudio reads them. Several channels are averaged (`channel` None: the reference's speech input,
    `audio.mean(0)`) or one is taken (`channel` 0: the reference's GLM-4-Voice tokenizer, `audio[0]`).
    Returns (wave [N], sample_rate). Raises AudioError for unreadable, empty or non-finite audio, or a missing
    channel.
    """
    path = Path(path)
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: cannot be read as audio ({e})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples")
    if channel is None:
        wave = wave.mean(axis=1)
    elif channel < wave.shape[1]:
        wave = wave[:, channel]
    else:
        raise AudioError(f"{path}: has {wave.shape[1]} channel(s), no channel {channel}")
    check_wave(wave, str(path))
    if target_sr is not None:
        wave, sr = resample(wave, sr, target_sr), target_sr
    return wave, sr


def check_wave(wave: np.ndarray, name: str = "waveform") -> np.ndarray:
    """Validates a mono waveform: 1-D, non-empty, finite."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"{name}: expected mono audio of shape [samples], got shape {wave.shape}")
    if wave.size == 0:
        raise AudioError(f"{name}: contains no samples")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: contains NaN or infinite samples (first at index "
                         f"{int(np.flatnonzero(~np.isfinite(wave))[0])})")
    return wave


def write_wav(path: str | os.PathLike, wave: np.ndarray, sr: int) -> None:
    """Writes a 16-bit PCM WAV atomically (`files.atomic_write`: no partial file on failure), replacing `path`."""
    path = Path(path)
    try:
        with atomic_write(path, overwrite=True) as tmp:
            sf.write(str(tmp), np.asarray(wave, np.float32), sr, subtype="PCM_16", format="WAV")
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"{path}: cannot be written ({e})") from None
