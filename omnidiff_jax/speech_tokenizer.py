"""Speech -> GLM-4-Voice codes at 12.5 Hz: the Whisper log-mel front end, 30 s chunking, and batched tokenizing.

Front end (transformers' `WhisperFeatureExtractor` as Omni-Diffusion `tokenizer_sensevoice_glm4voice.py` calls it):
a 16 kHz clip is zero-padded to a multiple of 1280 samples; a 400-point STFT with hop 160, periodic Hann window
and 200-sample reflect padding at both ends gives 1 + L/160 frames, of which the last is dropped; power spectrum,
128 slaney mel filters, log10 (floored at 1e-10), a floor at the clip's maximum - 8, then (x + 4) / 4.
Frame f is valid iff 160 f < samples. It runs in float64 NumPy on the host, overlapping the device's work: the
reference's float32 `torch.stft` is itself about 1.4e-5 off the exact values on real speech, a float32 XLA FFT
about as much again, and the codes are argmins.

Chunking (`extract_speech_token`): a clip is cut into 30 s segments, each tokenized on its own, codes concatenated.
A segment of n samples gives ceil(n / 1280) codes (conv stride 2 x pooling 4 x hop 160 = 1280 samples = 80 ms).

Every segment is tokenized as if it were alone: its log-mel is computed on its own and zero-padded to the batch
length, so its valid codes cannot see the rest of the batch. (The reference pads the waveforms of a batch before
the STFT, so a shorter clip's max - 8 floor also sees the frames straddling its end; that changes its features
only in the rare case that one of them is louder than all of its own frames.) Batch lengths are bucketed to multiples of 4 s so few shapes
get compiled; on a mesh, batches run data-parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omnidiff_jax import sharding
from omnidiff_jax.audio_io import AudioError, check_wave, load_audio, resample
from omnidiff_jax.convert.whisper_vq import load_checkpoint
from omnidiff_jax.models.whisper_vq import WhisperVQConfig, WhisperVQEncoder

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE
BUCKET_SAMPLES = 4 * SAMPLE_RATE  # batch lengths are rounded up to this (capped at CHUNK_SAMPLES)


# --------------------------------------------------------------------------------------------------- front end

def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
    hz = np.asarray(hz, np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


@functools.cache
def mel_filters(num_mels: int) -> np.ndarray:
    """[201, num_mels] float64 triangular filters on 0..8 kHz, slaney scale and area normalisation (librosa's)."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), num_mels + 2))  # [M + 2]
    width = np.diff(edges)
    offset = edges[None, :] - fft_hz[:, None]  # [F, M + 2]
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))  # equal area


def padded_length(num_samples: int, multiple: int) -> int:
    """`num_samples` rounded up to a multiple of `multiple`."""
    return -(-num_samples // multiple) * multiple


def clip_log_mel(wave: np.ndarray, num_mels: int = 128, samples_per_code: int = 1280) -> np.ndarray:
    """Whisper log-mel [padded/160, num_mels] float32 of one 16 kHz clip, computed in float64 on the host."""
    padded = np.zeros(padded_length(len(wave), samples_per_code), np.float64)
    padded[:len(wave)] = wave
    signal = np.pad(padded, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(signal, N_FFT)[::HOP][:-1]  # the last frame is dropped
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    spectrum = np.fft.rfft(frames * window, axis=-1)  # [F, 201]
    mel = np.log10(np.maximum((spectrum.real ** 2 + spectrum.imag ** 2) @ mel_filters(num_mels), 1e-10))
    return ((np.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0).astype(np.float32)


def log_mel(waves: Sequence[np.ndarray], length: int | None = None, num_mels: int = 128,
            samples_per_code: int = 1280) -> tuple[np.ndarray, np.ndarray]:
    """Each clip's log-mel as if alone, stacked into a batch zero-padded to `length` samples (default: the longest).

    Returns (mel [B, length/160, num_mels] float32, valid [B, length/160] bool: frame f is valid iff 160 f < n).
    """
    longest = max(padded_length(len(w), samples_per_code) for w in waves)
    length = longest if length is None else length
    if length % samples_per_code or length < longest:
        raise ValueError(f"batch length {length} must be a multiple of {samples_per_code} and hold every clip "
                         f"(longest padded clip: {longest} samples)")
    mel = np.zeros((len(waves), length // HOP, num_mels), np.float32)
    for row, wave in enumerate(waves):
        clip = clip_log_mel(wave, num_mels, samples_per_code)
        mel[row, :len(clip)] = clip
    valid = np.arange(length // HOP)[None, :] * HOP < np.array([len(w) for w in waves])[:, None]
    return mel, valid


# --------------------------------------------------------------------------------------------------- tokenizer

@dataclasses.dataclass
class SpeechTokenizer:
    """The GLM-4-Voice tokenizer with its weights. `tokenize` takes any number of clips of any length.

    batch_size: at most this many segments per device call (rounded up to a multiple of the mesh's data-parallel
    size). A call with fewer segments runs at its own size, so one clip under 30 s is a batch of 1 (each new
    size compiles once).
    mesh: run data-parallel on it (parameters replicated, segments split over its data and fsdp axes; one
    process: each host of a multi-host job tokenizes its own share of a corpus with its local devices).
    """

    config: WhisperVQConfig
    params: dict
    mesh: Mesh | None = None
    batch_size: int = 8

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.mesh is not None:
            self.batch_size = -(-self.batch_size // self._ways) * self._ways
            self.params = jax.device_put(self.params, NamedSharding(self.mesh, PartitionSpec()))

    @classmethod
    def load(cls, path: str | os.PathLike, mesh: Mesh | None = None, batch_size: int = 8) -> "SpeechTokenizer":
        """From the THUDM/glm-4-voice-tokenizer folder (config.json + model.safetensors), or a weights file in it."""
        config, params = load_checkpoint(path)
        return cls(config, params, mesh, batch_size)

    @property
    def _ways(self) -> int:
        """How many ways a batch is split (the mesh's data x fsdp; 1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def batch_rows(self, segments: int) -> int:
        """Rows of every device call of a `tokenize` call with `segments` 30 s segments: at most batch_size, and
        no more than the segments fill (rounded up to a multiple of the mesh's data-parallel ways)."""
        return min(self.batch_size, -(-segments // self._ways) * self._ways)

    @property
    def samples_per_code(self) -> int:
        return HOP * self.config.mel_frames_per_code

    @functools.cached_property
    def _encode(self):
        """jit(params, mel [B, T, M], valid [B, T]) -> codes [B, T/8] int32."""
        module = WhisperVQEncoder(self.config)
        encode = lambda params, mel, valid: module.apply({"params": params}, mel, valid)[1]  # noqa: E731
        if self.mesh is None:
            return jax.jit(encode)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        rows = functools.partial(sharding.batch_sharding, self.mesh)
        return jax.jit(encode, in_shardings=(replicated, rows(3), rows(2)), out_shardings=rows(2))

    def tokenize(self, waves: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
        """Mono float waveforms -> (codes [N, max_codes] int32 padded with -1, lengths [N] int32).

        Clips at another `sample_rate` are resampled to 16 kHz first. Clips longer than 30 s are cut into 30 s
        segments whose codes are concatenated, as the reference does.
        """
        if isinstance(waves, np.ndarray) and waves.ndim == 1:
            raise AudioError("tokenize takes a sequence of clips; wrap a single waveform in a list")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise AudioError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
        clips = [resample(check_wave(w, f"waves[{i}]"), int(sample_rate), SAMPLE_RATE) for i, w in enumerate(waves)]
        segments = [(i, start) for i, clip in enumerate(clips) for start in range(0, len(clip), CHUNK_SAMPLES)]
        seg_len = lambda s: min(CHUNK_SAMPLES, len(clips[s[0]]) - s[1])  # noqa: E731
        order = sorted(segments, key=seg_len, reverse=True)  # similar lengths share a batch
        rows = self.batch_rows(len(order))
        pending = []
        for first in range(0, len(order), rows):
            batch = order[first:first + rows]
            pieces = [clips[i][start:start + CHUNK_SAMPLES] for i, start in batch]
            length = min(CHUNK_SAMPLES, padded_length(len(pieces[0]), BUCKET_SAMPLES))
            mel, valid = log_mel(pieces, length, self.config.num_mel_bins, self.samples_per_code)
            filler = ((0, rows - len(batch)),)  # empty rows keep the batch shape fixed
            codes = self._encode(self.params, np.pad(mel, filler + ((0, 0),) * 2), np.pad(valid, filler + ((0, 0),)))
            pending.append((batch, pieces, codes))  # dispatched asynchronously: the next batch's log-mel overlaps
        found = {}
        for batch, pieces, codes in pending:
            codes = np.asarray(codes)
            for row, (segment, piece) in enumerate(zip(batch, pieces)):
                found[segment] = codes[row, :padded_length(len(piece), self.samples_per_code) // self.samples_per_code]
        per_clip = [np.concatenate([found[i, start] for start in range(0, len(clip), CHUNK_SAMPLES)])
                    for i, clip in enumerate(clips)]
        lengths = np.array([len(c) for c in per_clip], np.int32)
        out = np.full((len(clips), max(lengths, default=0)), -1, np.int32)
        for i, c in enumerate(per_clip):
            out[i, :len(c)] = c
        return out, lengths

    def tokenize_file(self, path: str | os.PathLike) -> np.ndarray:
        """Codes [n] int32 of one audio file (any rate soundfile reads, resampled to 16 kHz).

        Of several channels only the first is read, as the reference (`audio[0]`).
        """
        wave, _ = load_audio(Path(path), SAMPLE_RATE, channel=0)
        codes, lengths = self.tokenize([wave])
        return codes[0, :lengths[0]]

