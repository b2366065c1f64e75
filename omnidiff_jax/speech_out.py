"""Speech output: GLM-4-Voice codes -> 22.05 kHz waveform (flow-matching decoder to mel, then the HiFT vocoder).

    decoder = SpeechDecoder.load("glm-4-voice-decoder")         # config.yaml, flow.pt, hift.pt
    waves = decode_speech([codes_a, codes_b], decoder, seed=0)  # float32 [samples] each, in [-0.99, 0.99]

An utterance of N codes becomes 256 * mel_frames(N) samples (about 1764 per code). A call's utterances are grouped
by code-length bucket (N rounded up by at most 25%), and each group runs as one batch through the jitted flow and
vocoder, which compile once per (batch size, bucket). Padding is masked exactly, so an utterance's waveform does not
depend on its bucket or batch-mates: utterance i draws its randomness from fold_in(key(seed), i), and the noise is
drawn frame by frame. The reference (GLM-4-Voice `flow_matching.py`) seeds torch with 42 instead; to reproduce it
or any other implementation, pass its noise in the reference's layout: `SpeechDecoder.mel(codes, noise=...)` takes
the flow's starting noise z ([80, frames] per utterance: CFM's `randn_like(mu)`), `.vocode(..., phases=...,
noise=...)` the sine generator's draws ([9] initial phases, `phase_vec`, whose first is ignored, and [9, 256 frames]
standard normal noise, `randn_like(sine_waves)`), or `.vocode(..., source=...)` the finished harmonic source.

The reference never calls `.eval()` on the decoder, so its flow encoder runs with dropout 0.1 at inference and its
output is random from run to run even with the same noise; ours runs in eval mode and is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnidiff_jax.convert.glm4voice_decoder import flow_keymap, hift_keymap, read_decoder_config
from omnidiff_jax.convert.keymap import flatten
from omnidiff_jax.convert.sources import CheckpointError, open_source
from omnidiff_jax.models.flow import SAMPLE_RATE, Flow, FlowConfig, generate_mel, mel_frames
from omnidiff_jax.models.hift import HiFT, HiFTConfig


class CodesError(ValueError):
    """Speech codes that cannot be decoded; the message names the utterance, position and value at fault."""


def check_codes(codes, vocab_size: int) -> list[np.ndarray]:
    """A batch (a sequence of code sequences) as int32 arrays; each non-empty, 1-D, integer, in [0, vocab_size)."""
    if isinstance(codes, (str, bytes)) or not hasattr(codes, "__len__") or len(codes) == 0:
        raise CodesError("expected a non-empty batch: a sequence of code sequences")
    rows = []
    for i, row in enumerate(codes):
        arr = np.asarray(row)
        if arr.ndim != 1:
            raise CodesError(f"utterance {i}: expected a 1-D sequence of codes, got shape {arr.shape} (a single "
                             "utterance must be wrapped in a list)")
        if arr.size == 0:
            raise CodesError(f"utterance {i}: the code list is empty")
        if not np.issubdtype(arr.dtype, np.integer):
            raise CodesError(f"utterance {i}: codes must be integers, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            raise CodesError(f"utterance {i}: code {int(arr[bad[0]])} at position {int(bad[0])} is outside "
                             f"[0, {vocab_size})")
        rows.append(arr.astype(np.int32))
    return rows


def token_bucket(n: int) -> int:
    """The padded code length for n codes: n rounded up to a multiple of max(8, 2^(floor(log2 n) - 2))."""
    step = max(8, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def _frame_noise(key, frames: int, shape: tuple[int, ...]) -> jax.Array:
    """[frames, *shape] standard normal; frame f depends only on (key, f), not on how many frames are drawn."""
    return jax.vmap(lambda f: jax.random.normal(jax.random.fold_in(key, f), shape))(jnp.arange(frames))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _flow_noise(cfg: FlowConfig, keys, frames: int):
    return jax.vmap(lambda k: _frame_noise(k, frames, (cfg.output_size,)))(keys)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _source_randomness(cfg: HiFTConfig, keys, frames: int):
    """Per row: initial phases [H] ~ U(-pi, pi) and noise [frames, 256, H] ~ N(0, 1)."""

    def one(key):
        phase_key, noise_key = jax.random.split(key)
        phases = jax.random.uniform(phase_key, (cfg.harmonics,), minval=-math.pi, maxval=math.pi)
        return phases, _frame_noise(noise_key, frames, (cfg.samples_per_frame, cfg.harmonics))

    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnums=0)
def _flow_mel(cfg: FlowConfig, params, codes, token_lengths, frame_mask, noise):
    return generate_mel(Flow(cfg), params, codes, token_lengths, frame_mask, noise)


@functools.partial(jax.jit, static_argnums=0)
def _vocode(cfg: HiFTConfig, params, mel, frame_lengths, phases, noise):
    return HiFT(cfg).apply({"params": params}, mel, frame_lengths, phases, noise)


@functools.partial(jax.jit, static_argnums=0)
def _vocode_source(cfg: HiFTConfig, params, mel, frame_lengths, source):
    return HiFT(cfg).apply({"params": params}, mel, source, frame_lengths, method=HiFT.decode)


def _param_shapes(module, *args) -> dict:
    variables = jax.eval_shape(module.init, jax.random.key(0), *args)
    return flatten(variables["params"])


def flow_param_shapes(cfg: FlowConfig) -> dict:
    """Flat {path: ShapeDtypeStruct} of the flow's parameters, without allocating them."""
    codes, lengths = jax.ShapeDtypeStruct((1, 8), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    frames = jax.ShapeDtypeStruct((1, 55), jnp.bool_)
    x, t = jax.ShapeDtypeStruct((1, 55, cfg.output_size), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    return _param_shapes(Flow(cfg), codes, lengths, frames, x, t)


def hift_param_shapes(cfg: HiFTConfig) -> dict:
    """Flat {path: ShapeDtypeStruct} of the vocoder's parameters, without allocating them."""
    mel = jax.ShapeDtypeStruct((1, 4, cfg.in_channels), jnp.float32)
    lengths, phases = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, cfg.harmonics), jnp.float32)
    noise = jax.ShapeDtypeStruct((1, 4, cfg.samples_per_frame, cfg.harmonics), jnp.float32)
    return _param_shapes(HiFT(cfg), mel, lengths, phases, noise)


def _pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Stacks [n_i, ...] arrays zero-padded to [B, length, ...]."""
    out = np.zeros((len(rows), length) + np.shape(rows[0])[1:], np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@dataclasses.dataclass
class SpeechDecoder:
    """The flow decoder and vocoder with their float32 parameters (plain nested dicts)."""

    flow_config: FlowConfig
    hift_config: HiFTConfig
    flow_params: dict
    hift_params: dict

    sample_rate = SAMPLE_RATE

    @classmethod
    def load(cls, folder: str | Path) -> "SpeechDecoder":
        """Reads a `THUDM/glm-4-voice-decoder` folder: config.yaml, flow.pt and hift.pt (weights only)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a folder (expected config.yaml, flow.pt and hift.pt in it)")
        flow_cfg, hift_cfg = read_decoder_config(folder / "config.yaml")
        flow = flow_keymap(flow_cfg).load(open_source(folder / "flow.pt"), flow_param_shapes(flow_cfg),
                                          dtype=np.float32)
        hift = hift_keymap(hift_cfg).load(open_source(folder / "hift.pt"), hift_param_shapes(hift_cfg),
                                          dtype=np.float32)
        return cls(flow_cfg, hift_cfg, flow, hift)

    def mel(self, codes, *, keys=None, noise=None) -> tuple[jax.Array, np.ndarray]:
        """Mel spectrograms of a batch: ([B, T, C] padded to the bucket's frame count, each row's frame count).

        Exactly one of `keys` ([B] JAX keys) or `noise` (per utterance a [C, frames_i] array in the reference's
        layout: the solver's starting point, CFM's z = randn_like(mu)[0]).
        """
        rows = check_codes(codes, self.flow_config.vocab_size)
        if (keys is None) == (noise is None):
            raise ValueError("give exactly one of keys or noise")
        lengths = np.array([len(r) for r in rows], np.int32)
        frames = mel_frames(lengths)
        n = token_bucket(int(lengths.max()))
        t = int(mel_frames(n))
        if noise is None:
            z = _flow_noise(self.flow_config, keys, t)
        else:
            shapes = [np.shape(z) for z in noise]
            want = [(self.flow_config.output_size, int(f)) for f in frames]
            if shapes != want:
                raise ValueError(f"noise shapes {shapes} do not match the utterances' [mel bins, frames] {want}")
            z = _pad_rows([np.transpose(z) for z in noise], t)
        mel = _flow_mel(self.flow_config, self.flow_params, _pad_rows(rows, n).astype(np.int32), lengths,
                        np.arange(t)[None] < frames[:, None], z)
        return mel, frames

    def vocode(self, mel, frame_lengths, *, keys=None, phases=None, noise=None, source=None) -> np.ndarray:
        """Waveforms [B, 256 T] of mel [B, T, C]; row b is valid for 256 * frame_lengths[b] samples.

        The sine generator's randomness comes from one of: `keys` ([B] JAX keys); `phases` and `noise` in the
        reference's layout (per utterance [H] initial phases, H = 9 harmonics, the first ignored, and [H, 256
        frame_lengths_i] standard normal noise: SineGen's `phase_vec[:, :, 0]` and `randn_like(sine_waves)`); or
        `source` (per utterance the finished harmonic source signal, [256 frame_lengths_i]).
        """
        cfg = self.hift_config
        frame_lengths = np.asarray(frame_lengths, np.int32)
        given = [x for x in (keys, phases, source) if x is not None]
        if len(given) != 1 or (phases is None) != (noise is None):
            raise ValueError("give exactly one of keys, phases with noise, or source")
        if source is not None:
            s = _pad_rows([np.asarray(x, np.float32) for x in source], mel.shape[1] * cfg.samples_per_frame)
            return np.asarray(_vocode_source(cfg, self.hift_params, mel, frame_lengths, s))
        if keys is not None:
            phases, noise = _source_randomness(cfg, keys, mel.shape[1])
        else:
            phases, noise = self._reference_draws(phases, noise, frame_lengths, mel.shape[1])
        return np.asarray(_vocode(cfg, self.hift_params, mel, frame_lengths, phases, noise))


    def _reference_draws(self, phases, noise, frame_lengths: np.ndarray, frames: int):
        """Per-utterance phases [H] and noise [H, 256 f_b] -> our layout: phases [B, H], noise [B, T, 256, H]."""
        hop, h = self.hift_config.samples_per_frame, self.hift_config.harmonics
        want = [((h,), (h, hop * int(f))) for f in frame_lengths]
        got = [(np.shape(p), np.shape(n)) for p, n in zip(phases, noise)]
        if len(phases) != len(frame_lengths) or len(noise) != len(frame_lengths) or got != want:
            raise ValueError(f"phases and noise shapes {got} do not match the utterances' ([harmonics], "
                             f"[harmonics, samples]) {want}")
        per_frame = [np.asarray(n, np.float32).reshape(h, -1, hop).transpose(1, 2, 0) for n in noise]
        return np.asarray(phases, np.float32), _pad_rows(per_frame, frames)


def _row_keys(seed: int, rows: Sequence[int], stream: int):
    key = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(jnp.asarray(rows))


def _bucket_groups(rows: Sequence[np.ndarray]) -> list[list[int]]:
    """Utterance indices grouped by code-length bucket, shortest bucket first."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(token_bucket(len(r)), []).append(i)
    return [members for _, members in sorted(groups.items())]


def decode_mel(codes, decoder: SpeechDecoder, *, seed: int = 0) -> list[np.ndarray]:
    """The flow's mel spectrograms of a batch of code sequences: float32 [80, frames] per utterance (the
    reference's layout), exactly the mels `decode_speech` with the same seed vocodes."""
    rows = check_codes(codes, decoder.flow_config.vocab_size)
    out: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
    for members in _bucket_groups(rows):
        mel, frames = decoder.mel([rows[i] for i in members], keys=_row_keys(seed, members, 0))
        mel = np.asarray(mel)
        for j, i in enumerate(members):
            out[i] = mel[j, :frames[j]].T
    return out


def decode_speech(codes, decoder: SpeechDecoder, *, seed: int = 0) -> list[np.ndarray]:
    """Decodes a batch of GLM-4-Voice code sequences to float32 waveforms at 22050 Hz, one per utterance.

    codes: a sequence of integer sequences in [0, 16384). Raises CodesError (a ValueError) naming the utterance,
    position and value of the first bad code, or an empty utterance.
    """
    rows = check_codes(codes, decoder.flow_config.vocab_size)
    out: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
    hop = decoder.hift_config.samples_per_frame
    for members in _bucket_groups(rows):
        mel, frames = decoder.mel([rows[i] for i in members], keys=_row_keys(seed, members, 0))
        waves = decoder.vocode(mel, frames, keys=_row_keys(seed, members, 1))
        for j, i in enumerate(members):
            out[i] = waves[j, :frames[j] * hop]
    return out


NOISE_ARRAYS = {"z": "[80, frames], the flow's starting noise", "phases": "[9], the sine generator's phases",
                "sine_noise": "[9, 256 frames], the sine generator's noise"}  # a noise file, the reference's layout


def decode_with_noise(codes, decoder: SpeechDecoder, noise: dict, *, mel_only: bool = False) -> np.ndarray:
    """One utterance decoded with the given noise in the reference's layout (`NOISE_ARRAYS`; `z` alone for the
    mel): the mel [80, frames] if `mel_only`, else the waveform [256 frames]."""
    for key in list(NOISE_ARRAYS)[:1 if mel_only else 3]:
        if key not in noise:
            raise ValueError(f"the noise holds no {key!r} array ({NOISE_ARRAYS[key]})")
    mel, frames = decoder.mel([codes], noise=[noise["z"]])
    if mel_only:
        return np.asarray(mel)[0, :frames[0]].T
    wave = decoder.vocode(mel, frames, phases=[noise["phases"]], noise=[noise["sine_noise"]])
    return wave[0, :frames[0] * decoder.hift_config.samples_per_frame]
