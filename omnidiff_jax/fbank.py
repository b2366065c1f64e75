"""SenseVoice's speech front end: Kaldi-compatible log-mel filter bank, low frame rate stacking (LFR) and CMVN.

FunASR `funasr/frontends/wav_frontend.py`, as Omni-Diffusion `tokenizer_sensevoice_glm4voice.py` calls it.
A 16 kHz waveform in [-1, 1] becomes float32 features [T_lfr, 560]:

    x = wave * 32768                                           (Kaldi works in the int16 range)
    frames of 400 samples every 160 (25 / 10 ms, snip_edges)   T = 1 + (N - 400) // 160
    per frame: + dither * N(0, 1), - mean, pre-emphasis 0.97, symmetric Hamming, zero-pad to 512
    fbank = log(max(|rfft|² @ mel, eps))                        80 Kaldi-mel triangles over 20 Hz .. 8 kHz
    lfr[i] = fbank[6i-3 .. 6i+3] (indices clamped), 560 wide   T_lfr = ceil(T / 6)
    feats = (lfr + shift) * scale                              CMVN from SenseVoiceSmall's `am.mvn`

The reference runs Kaldi's default dither 1.0, so its features differ on every run. We default to dither 0 for
reproducible features; pass `dither=1.0` (and an `rng` seed) to reproduce that augmentation.

Everything is vectorised NumPy over a batch of clips (no per-shape compilation, which matters because every clip
has its own length). SenseVoiceSmall's CMVN statistics are built in (`SENSEVOICE_CMVN`); `read_am_mvn` parses
the Kaldi nnet text file it ships as.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from omnidiff_jax.audio_io import AudioError, check_wave

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # the frame length rounded up to a power of two
NUM_MEL_BINS = 80
LOW_FREQ = 20.0  # Hz; the high edge is the Nyquist frequency
PREEMPHASIS = 0.97
LFR_M, LFR_N = 7, 6  # stack 7 frames, advance 6
FEATURE_SIZE = NUM_MEL_BINS * LFR_M  # 560
INT16_SCALE = 32768.0
LOG_FLOOR = float(np.finfo(np.float32).eps)

# SenseVoiceSmall's am.mvn: per mel bin, the <AddShift> (negative mean) and <Rescale> (inverse std) vectors.
# The file repeats these 80 values for each of the 7 stacked frames.
_SHIFT_80 = (
    -8.311879, -8.600912, -9.615928, -10.43595, -11.21292, -11.88333, -12.36243, -12.63706, -12.8818, -12.83066,
    -12.89103, -12.95666, -13.19763, -13.40598, -13.49113, -13.5546, -13.55639, -13.51915, -13.68284, -13.53289,
    -13.42107, -13.65519, -13.50713, -13.75251, -13.76715, -13.87408, -13.73109, -13.70412, -13.56073, -13.53488,
    -13.54895, -13.56228, -13.59408, -13.62047, -13.64198, -13.66109, -13.62669, -13.58297, -13.57387, -13.4739,
    -13.53063, -13.48348, -13.61047, -13.64716, -13.71546, -13.79184, -13.90614, -14.03098, -14.18205, -14.35881,
    -14.48419, -14.60172, -14.70591, -14.83362, -14.92122, -15.00622, -15.05122, -15.03119, -14.99028, -14.92302,
    -14.86927, -14.82691, -14.7972, -14.76909, -14.71356, -14.61277, -14.51696, -14.42252, -14.36405, -14.30451,
    -14.23161, -14.19851, -14.16633, -14.15649, -14.10504, -13.99518, -13.79562, -13.3996, -12.7767, -11.71208,
)
_SCALE_80 = (
    0.155775, 0.154484, 0.1527379, 0.1518718, 0.1506028, 0.1489256, 0.147067, 0.1447061, 0.1436307, 0.1443568,
    0.1451849, 0.1455157, 0.1452821, 0.1445717, 0.1439195, 0.1435867, 0.1436018, 0.1438781, 0.1442086, 0.1448844,
    0.1454756, 0.145663, 0.146268, 0.1467386, 0.1472724, 0.147664, 0.1480913, 0.1483739, 0.1488841, 0.1493636,
    0.1497088, 0.1500379, 0.1502916, 0.1505389, 0.1506787, 0.1507102, 0.1505992, 0.1505445, 0.1505938, 0.1508133,
    0.1509569, 0.1512396, 0.1514625, 0.1516195, 0.1516156, 0.1515561, 0.1514966, 0.1513976, 0.1512612, 0.151076,
    0.1510596, 0.1510431, 0.151077, 0.1511168, 0.1511917, 0.151023, 0.1508045, 0.1505885, 0.1503493, 0.1502373,
    0.1501726, 0.1500762, 0.1500065, 0.1499782, 0.150057, 0.1502658, 0.150469, 0.1505335, 0.1505505, 0.1505328,
    0.1504275, 0.1502438, 0.1499674, 0.1497118, 0.1494661, 0.1493102, 0.1493681, 0.1495501, 0.1499738, 0.1509654,
)


class CmvnError(ValueError):
    """An `am.mvn` file that cannot be parsed or does not fit the features; the message names the file."""


# --------------------------------------------------------------------------------------------------- fbank

def num_frames(num_samples: int) -> int:
    """Kaldi frame count with snip_edges: 1 + (N - 400) // 160, or 0 when shorter than one frame."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def num_lfr_frames(frames: int) -> int:
    """LFR output frames for `frames` fbank frames: ceil(T / 6)."""
    return -(-frames // LFR_N)


@functools.cache
def hamming_window() -> np.ndarray:
    """Kaldi's symmetric Hamming window, 0.54 - 0.46 cos(2πn / 399), [400] float32."""
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    return (0.54 - 0.46 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))).astype(np.float32)


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.cache
def mel_banks() -> np.ndarray:
    """Kaldi's triangular mel filters as a [257, 80] float32 matrix (the Nyquist bin has weight 0)."""
    low, high = _mel(LOW_FREQ), _mel(SAMPLE_RATE / 2)
    delta = (high - low) / (NUM_MEL_BINS + 1)
    left = low + delta * np.arange(NUM_MEL_BINS)[:, None]  # [80, 1]
    center, right = left + delta, left + 2 * delta
    mel = _mel(SAMPLE_RATE / FFT_SIZE * np.arange(FFT_SIZE // 2))[None, :]  # [1, 256]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # [80, 256]
    return np.concatenate([banks, np.zeros((NUM_MEL_BINS, 1))], axis=1).T.astype(np.float32)


def fbank(samples: np.ndarray, dither: float = 0.0, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Kaldi log-mel filter bank of `samples` [..., N] (int16 range) -> float32 [..., T, 80].

    dither: standard deviation of the Gaussian noise added to every frame sample (Kaldi adds it per frame, after
    framing). rng: a NumPy Generator or seed for that noise (None draws fresh entropy, as the reference does).
    """
    samples = np.asarray(samples, np.float32)
    t = num_frames(samples.shape[-1])
    if t == 0:
        raise AudioError(f"{samples.shape[-1]} samples is shorter than one {FRAME_LENGTH}-sample frame")
    frames = np.lib.stride_tricks.sliding_window_view(samples, FRAME_LENGTH, axis=-1)[..., ::FRAME_SHIFT, :]
    frames = frames.astype(np.float32)  # [..., T, 400], a copy
    if dither:
        frames += np.float32(dither) * np.random.default_rng(rng).standard_normal(frames.shape, np.float32)
    frames -= frames.mean(axis=-1, keepdims=True)
    # Pre-emphasis with the first sample replicated to its left: y[0] = x[0] - 0.97 x[0].
    frames = np.concatenate([frames[..., :1] * np.float32(1 - PREEMPHASIS),
                             frames[..., 1:] - np.float32(PREEMPHASIS) * frames[..., :-1]], axis=-1)
    spectrum = np.fft.rfft(frames * hamming_window(), n=FFT_SIZE, axis=-1)  # [..., T, 257]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    return np.log(np.maximum(power @ mel_banks(), np.float32(LOG_FLOOR)))


# --------------------------------------------------------------------------------------------------- LFR + CMVN

def lfr(feats: np.ndarray, lengths: Sequence[int] | None = None) -> np.ndarray:
    """Stacks 7 frames every 6: [B, T, 80] -> [B, ceil(T/6), 560]; frame i holds frames 6i-3 .. 6i+3.

    Indices are clamped to each clip's [0, length - 1] (lengths [B], default T), which repeats the first frame
    three times on the left and the last frame on the right. Rows past a clip's own ceil(length/6) are junk.
    """
    b, t, d = feats.shape
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    offsets = LFR_N * np.arange(num_lfr_frames(t))[:, None] + np.arange(LFR_M)[None, :] - (LFR_M - 1) // 2
    index = np.clip(offsets[None], 0, lengths[:, None, None] - 1)  # [B, T_lfr, 7]
    stacked = np.take_along_axis(feats, index.reshape(b, -1, 1), axis=1)  # [B, T_lfr*7, 80]
    return stacked.reshape(b, -1, LFR_M * d)


class Cmvn:
    """Feature normalisation `(x + shift) * scale`, both [560]: Kaldi's <AddShift> and <Rescale> vectors."""

    def __init__(self, shift: np.ndarray, scale: np.ndarray, origin: str = "built-in SenseVoiceSmall statistics"):
        self.shift = np.asarray(shift, np.float32)
        self.scale = np.asarray(scale, np.float32)
        self.origin = origin
        if self.shift.shape != (FEATURE_SIZE,) or self.scale.shape != (FEATURE_SIZE,):
            raise CmvnError(f"{origin}: CMVN vectors must be [{FEATURE_SIZE}], got shift {self.shift.shape} "
                            f"and scale {self.scale.shape}")

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        return (feats + self.shift) * self.scale

    def __repr__(self) -> str:
        return f"Cmvn({self.origin})"


SENSEVOICE_CMVN = Cmvn(np.tile(_SHIFT_80, LFR_M), np.tile(_SCALE_80, LFR_M))


def read_am_mvn(path: str | os.PathLike) -> Cmvn:
    """Parses a Kaldi nnet text `am.mvn` (<AddShift> and <Rescale> components, each followed by
    `<LearnRateCoef> 0 [ v1 ... vn ]`) into a `Cmvn`. Raises CmvnError naming the file and the problem."""
    path = Path(path)
    try:
        tokens = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as e:
        raise CmvnError(f"{path}: cannot be read as an am.mvn text file ({e})") from None
    vectors = {}
    for tag in ("<AddShift>", "<Rescale>"):
        if tokens.count(tag) != 1:
            raise CmvnError(f"{path}: expected one {tag} component, found {tokens.count(tag)}")
        at = tokens.index(tag)
        try:
            dim = int(tokens[at + 1])
            open_at = tokens.index("[", at)
            close_at = tokens.index("]", open_at)
            values = np.array(tokens[open_at + 1:close_at], dtype=np.float32)
        except (IndexError, ValueError) as e:
            raise CmvnError(f"{path}: malformed {tag} component ({e})") from None
        if "<LearnRateCoef>" not in tokens[at:open_at]:
            raise CmvnError(f"{path}: {tag} is not followed by `<LearnRateCoef> 0 [ ... ]`")
        if values.size != dim or not np.isfinite(values).all():
            raise CmvnError(f"{path}: {tag} declares {dim} values but holds {values.size}"
                            + ("" if np.isfinite(values).all() else ", some of them not finite"))
        vectors[tag] = values
    return Cmvn(vectors["<AddShift>"], vectors["<Rescale>"], origin=str(path))


# --------------------------------------------------------------------------------------------------- the front end

def wave_features(waves: Sequence[np.ndarray], cmvn: Cmvn = SENSEVOICE_CMVN, dither: float = 0.0,
                  rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono waves in [-1, 1] -> (features [B, T_lfr_max, 560] float32, zero-padded; lengths [B] int32).

    Each clip's rows equal what it would get alone (to float32 rounding). Raises AudioError for a wave that is not 1-D, is empty,
    holds NaN/inf, or is shorter than one 25 ms frame.
    """
    if not len(waves):
        raise AudioError("no waveforms given")
    waves = [check_wave(w, f"waveform {k}") for k, w in enumerate(waves)]
    for k, w in enumerate(waves):
        if w.size < FRAME_LENGTH:
            raise AudioError(f"waveform {k}: {w.size} samples ({1000 * w.size / SAMPLE_RATE:.1f} ms) is shorter "
                             f"than one {FRAME_LENGTH}-sample (25 ms) frame")
    batch = np.zeros((len(waves), max(w.size for w in waves)), np.float32)
    for k, w in enumerate(waves):
        batch[k, :w.size] = w
    frames = np.array([num_frames(w.size) for w in waves])
    feats = cmvn(lfr(fbank(batch * np.float32(INT16_SCALE), dither, rng), frames))
    lengths = np.array([num_lfr_frames(f) for f in frames], np.int32)
    feats[np.arange(feats.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return feats.astype(np.float32), lengths


def features(wave: np.ndarray, cmvn: Cmvn = SENSEVOICE_CMVN, dither: float = 0.0,
             rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One 16 kHz mono wave in [-1, 1] -> float32 features [T_lfr, 560] (see `wave_features`)."""
    feats, _ = wave_features([wave], cmvn, dither, rng)
    return feats[0]


__all__ = ["fbank", "lfr", "Cmvn", "SENSEVOICE_CMVN", "read_am_mvn", "wave_features", "features", "num_frames",
           "num_lfr_frames", "mel_banks", "hamming_window", "CmvnError"]
