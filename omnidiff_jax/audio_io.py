"""Reading audio files: soundfile decode, downmix to mono, band-limited resampling (soxr), validation.

The reference reads with torchaudio (float in [-1, 1]), downmixes with `mean(0)` and resamples with torchaudio's
windowed-sinc `Resample` (sinc_interp_hann, width 6, rolloff 0.99). We use soxr at "VHQ" quality, a band-limited
polyphase resampler; scripts/compare notes in the speech-input module say how close the two are.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """An audio file or waveform that cannot be used; the message names the file and the problem."""


def resample(wave: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of a mono float waveform (soxr, very high quality)."""
    if sr == target_sr:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave.astype(np.float32, copy=False), sr, target_sr, quality="VHQ").astype(np.float32)


def load_audio(path: str | os.PathLike, target_sr: int | None = 16000) -> tuple[np.ndarray, int]:
    """Reads `path` as float32 mono in [-1, 1], resampled to `target_sr` (None keeps the file's rate).

    Returns (wave [N], sample_rate). Raises AudioError for unreadable, empty, multi-dimensional or non-finite audio.
    """
    path = Path(path)
    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"{path}: cannot be read as audio ({e})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples")
    wave = wave.mean(axis=1)  # downmix, as the reference's audio.mean(0)
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
    """Writes a 16-bit PCM WAV via a temporary sibling and a rename (no partial file on failure)."""
    path = Path(path)
    if not path.parent.exists():
        raise AudioError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        sf.write(str(tmp), np.asarray(wave, np.float32), sr, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise AudioError(f"{path}: cannot be written ({e})") from None
