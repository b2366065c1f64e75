"""Speech input for the LLM: audio file -> features -> SenseVoice encoder -> projector -> placeholder embeddings.

Omni-Diffusion `modeling_sensevoice.py`, `resampler_projector.py`, `audio_processor.py`. The user-side audio of ASR,
speech-to-image and spoken VQA enters Dream as continuous embeddings rather than tokens:

    wave   = load_wave(path)                                16 kHz mono float in [-1, 1] (audio_io.load_audio)
    feats  = fbank.wave_features(waves)                     [N, T_lfr, 560], T_lfr ≈ 16.7 per second
    embeds = projector(sensevoice(feats))                   [N, T_lfr + 4, H]: 4 prompt rows, then the frames
    ids, positions = expand_audio_placeholders(ids, T_lfr)  <|audio|> -> <|begin_of_audio|>
                                                               <|context_of_audio|> x (T_lfr + 4) <|end_of_audio|>
    inputs_embeds  = scatter_audio(embed(ids), embeds, positions)   overwrite the context slots

`SpeechInput` holds the weights and runs the first three steps (`__call__`); without a projector (SenseVoice alone,
`load_sensevoice`) it stops at the encoder's [N, T_lfr + 4, 512] output. `encode` is the pure function a jitted
trainer step can call; `expand_audio_placeholders` and `scatter_audio` are shared by the sampler and
the trainer. Placeholder positions are padded with -1 (nothing written) so they batch with static shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omnidiff_jax import fbank
from omnidiff_jax.audio_io import AudioError, load_audio
from omnidiff_jax.convert.sensevoice import load_sensevoice_small, load_speech_encoder, sensevoice_small_config
from omnidiff_jax.convert.sources import Source
from omnidiff_jax.fbank import SENSEVOICE_CMVN, Cmvn
from omnidiff_jax.models import projector as projector_lib
from omnidiff_jax.models import sensevoice
from omnidiff_jax.models.projector import Projector, ProjectorConfig
from omnidiff_jax.models.sensevoice import SenseVoiceConfig, SenseVoiceEncoder
from omnidiff_jax.vocab import TokenLayout

AUDIO_PROMPT_TOKENS = 4  # SenseVoice's language, event, emotion and text-norm rows, placed before the frames
FRAME_BUCKET = 32  # LFR frames (~1.9 s): clips are padded to a multiple so jit compiles once per bucket


def load_wave(path: str | os.PathLike) -> np.ndarray:
    """Reads an audio file as 16 kHz mono float32 in [-1, 1] (channels averaged, the reference's resampler),
    at least one 25 ms fbank frame long.

    Raises AudioError for unreadable, empty or non-finite audio, or audio shorter than one 25 ms frame.
    """
    wave, _ = load_audio(path, target_sr=fbank.SAMPLE_RATE)
    if wave.size < fbank.FRAME_LENGTH:
        raise AudioError(f"{path}: {wave.size} samples at 16 kHz ({1000 * wave.size / fbank.SAMPLE_RATE:.1f} ms) "
                         f"is shorter than one 25 ms frame")
    return wave


def encode(params: dict, feats: jax.Array, lengths: jax.Array, encoder: SenseVoiceConfig,
           projector: ProjectorConfig | None) -> tuple[jax.Array, jax.Array]:
    """Features [N, T, 560] + lengths [N] -> (LLM-width embeddings [N, T+4, H], lengths + 4). Pure and jittable.

    params: `{"encoder": ..., "projector": ...}`. Rows past a clip's length are junk (never scattered).
    projector None: the encoder's output [N, T+4, output_size] (params need no "projector").
    """
    x, out_lengths = SenseVoiceEncoder(encoder).apply({"params": params["encoder"]}, feats, lengths)
    if projector is None:
        return x, out_lengths
    return Projector(projector).apply({"params": params["projector"]}, x), out_lengths


@dataclasses.dataclass
class SpeechInput:
    """The speech-input weights and front end. `speech(["a.wav", wave])` -> (embeddings, lengths).

    projector None: SenseVoice alone; the outputs are the encoder's [N, T+4, output_size].
    """

    encoder: SenseVoiceConfig
    projector: ProjectorConfig | None
    params: dict  # {"encoder": ..., "projector": ...} ("projector" absent without one)
    cmvn: Cmvn = SENSEVOICE_CMVN

    def features(self, audio: Sequence[str | os.PathLike | np.ndarray], dither: float = 0.0,
                 rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Paths or 16 kHz mono waves -> (features [N, T_lfr_max, 560] float32, T_lfr per clip [N])."""
        waves = [a if isinstance(a, np.ndarray) else load_wave(a) for a in audio]
        return fbank.wave_features(waves, self.cmvn, dither, rng)

    @functools.cached_property
    def _encode(self):
        return jax.jit(functools.partial(encode, encoder=self.encoder, projector=self.projector))

    def embed(self, feats: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Features [N, T, 560] + lengths [N] -> (embeddings [N, T+4, H], lengths + 4), jitted per length bucket."""
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 3 or feats.shape[-1] != self.encoder.input_size:
            raise ValueError(f"features must be [clips, frames, {self.encoder.input_size}], got {feats.shape}")
        lengths = np.asarray(lengths, np.int32)
        if lengths.shape != feats.shape[:1] or lengths.min(initial=1) < 1 or lengths.max(initial=0) > feats.shape[1]:
            raise ValueError(f"lengths {lengths.tolist()} must give 1..{feats.shape[1]} frames for each of the "
                             f"{feats.shape[0]} clips")
        t = feats.shape[1]
        padded = np.pad(feats, ((0, 0), (0, -t % FRAME_BUCKET), (0, 0)))
        embeds, out_lengths = self._encode(self.params, padded, lengths)
        return embeds[:, :t + self.encoder.num_prompts], out_lengths

    def __call__(self, audio: Sequence[str | os.PathLike | np.ndarray], dither: float = 0.0,
                 rng: np.random.Generator | int | None = None) -> tuple[jax.Array, jax.Array]:
        """Paths or 16 kHz mono waves -> (embeddings [N, T_lfr_max + 4, H], T_lfr + 4 per clip [N])."""
        return self.embed(*self.features(audio, dither, rng))


def init_speech_input(encoder: SenseVoiceConfig = SenseVoiceConfig.tiny(),
                      projector: ProjectorConfig = ProjectorConfig.tiny(), seed: int = 0) -> SpeechInput:
    """Random weights (tests, demos)."""
    params = {"encoder": sensevoice.init_params(encoder, seed), "projector": projector_lib.init_params(projector, seed)}
    return SpeechInput(encoder, projector, params)


def _with_dtype(config, dtype: str | None):
    return config if config is None or dtype is None else config.replace(dtype=dtype, param_dtype=dtype)


def load_speech_input(source: Source | str | os.PathLike, encoder: SenseVoiceConfig = SenseVoiceConfig.small(),
                      projector: ProjectorConfig | None = ProjectorConfig.omni_diffusion(), dtype: str | None = None,
                      cmvn: Cmvn = SENSEVOICE_CMVN) -> SpeechInput:
    """The speech-input weights of an Omni-Diffusion checkpoint (`model.audio_model.*`, `model.audio_projection.*`).

    projector None: the encoder alone (the checkpoint's projector keys are ignored). dtype: 'float32' or
    'bfloat16' for parameters and compute (default: the configs' dtypes); float32 is float32 end to end (see
    `models.sensevoice`), bfloat16 the reference's numerics.
    """
    encoder, projector = _with_dtype(encoder, dtype), _with_dtype(projector, dtype)
    params = load_speech_encoder(source, encoder, projector, dtype=encoder.param_dtype)
    return SpeechInput(encoder, projector, params, cmvn)


def load_sensevoice(path: str | os.PathLike, encoder: SenseVoiceConfig | None = None,
                    dtype: str | None = None) -> SpeechInput:
    """A standalone SenseVoiceSmall as a `SpeechInput` without a projector: its released folder (`model.pt` +
    `am.mvn` + `config.yaml`), a folder with `model.safetensors` + `am.mvn`, or the weights file with `am.mvn`
    beside it. encoder: its shape (default: the `config.yaml` beside the weights, else SenseVoiceSmall's)."""
    encoder = _with_dtype(sensevoice_small_config(path) if encoder is None else encoder, dtype)
    params, cmvn = load_sensevoice_small(path, encoder, dtype=encoder.param_dtype)
    return SpeechInput(encoder, None, {"encoder": params}, cmvn)


# --------------------------------------------------------------------------------------------------- placeholders

def expand_audio_placeholders(ids: Sequence[int] | np.ndarray, frame_counts: Sequence[int],
                              layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
    """Replaces the k-th `<|audio|>` tag of a 1-D prompt by `<|begin_of_audio|>`, `<|context_of_audio|>` ×
    (frame_counts[k] + 4) and `<|end_of_audio|>`.

    Returns (ids int32 [L'], positions int32 [K, S]): positions[k, j] is where the j-th embedding row of audio k
    goes (the 4 prompt rows, then its frames), padded with -1 to S = max_k frame_counts[k] + 4.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer sequence, got shape {ids.shape} and dtype {ids.dtype}")
    counts = np.asarray(frame_counts, np.int64).reshape(-1)
    tags = np.flatnonzero(ids == layout.audio_tag)
    if len(tags) != len(counts):
        raise ValueError(f"the prompt holds {len(tags)} <|audio|> tag(s) (id {layout.audio_tag}) but "
                         f"{len(counts)} frame count(s) were given")
    if (counts < 1).any():
        raise ValueError(f"frame counts must be positive, got {counts.tolist()}")
    slots = counts + AUDIO_PROMPT_TOKENS
    pieces, positions = [], np.full((len(counts), int(slots.max(initial=0))), -1, np.int32)
    start, length = 0, 0
    for k, (tag, n) in enumerate(zip(tags, slots)):
        pieces.append(ids[start:tag])
        length += tag - start
        positions[k, :n] = np.arange(length + 1, length + 1 + n)  # after <|begin_of_audio|>
        pieces.append(np.array([layout.begin_of_audio] + [layout.context_of_audio] * n + [layout.end_of_audio]))
        length += n + 2
        start = tag + 1
    pieces.append(ids[start:])
    return np.concatenate(pieces).astype(np.int32), positions


def scatter_audio(embeds: jax.Array, features: jax.Array, positions: jax.Array,
                  rows: jax.Array | None = None) -> jax.Array:
    """Overwrites placeholder embeddings with audio embeddings. Jittable; static shapes throughout.

    embeds [B, L, H]; features [K, S', H] with S' >= S (e.g. `SpeechInput` output); positions [K, S] (sequence
    position of each feature row, -1 = skip); rows [K]: the batch row of each audio (default 0). Returns embeds
    with `embeds[rows[k], positions[k, j]] = features[k, j]`, cast to embeds' dtype.
    """
    if embeds.ndim != 3 or positions.ndim != 2:
        raise ValueError(f"embeds must be [batch, length, hidden] and positions [audios, slots], got shapes "
                         f"{tuple(embeds.shape)} and {tuple(positions.shape)}")
    l, h = embeds.shape[1:]
    k, s = positions.shape
    if features.ndim != 3 or features.shape[0] != k or features.shape[1] < s or features.shape[2] != h:
        raise ValueError(f"features must be [{k}, >={s}, {h}] to fill positions {tuple(positions.shape)} of "
                         f"embeds {tuple(embeds.shape)}, got {tuple(features.shape)}")
    rows = jnp.zeros((k,), jnp.int32) if rows is None else jnp.asarray(rows, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    target = jnp.where(positions >= 0, positions, l)  # out of range: dropped (a bare -1 would wrap around)
    batch = jnp.broadcast_to(rows[:, None], (k, s))
    return embeds.at[batch, target].set(features[:, :s].astype(embeds.dtype), mode="drop")


__all__ = ["SpeechInput", "encode", "load_wave", "init_speech_input", "load_speech_input", "load_sensevoice",
           "expand_audio_placeholders", "scatter_audio", "AUDIO_PROMPT_TOKENS"]
