"""User speech in training: the SenseVoice encoder (frozen) and the projector (trained) wired into the loss.

`speech_encoder` wraps a `speech_in.SpeechInput` as the `loss.SpeechEncoder` the train step calls;
`speech_input_from_config` finds the weights a config's `speech.path` names.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from omnidiff_jax.checkpoint import load_speech
from omnidiff_jax.config import dream_config
from omnidiff_jax.convert.sensevoice import load_sensevoice_small, sensevoice_small_config
from omnidiff_jax.models import projector
from omnidiff_jax.speech_in import SpeechInput, encode
from omnidiff_jax.train.loss import SpeechEncoder


def speech_encoder(speech: SpeechInput, max_audios: int, max_frames: int) -> SpeechEncoder:
    """Wraps a `speech_in.SpeechInput` (SenseVoice + projector weights): the encoder stays frozen (and runs
    deterministically: the reference's dropout 0.1 in the frozen encoder is not reproduced), the projector
    trains as `params["audio_projection"]`."""

    def embed(params, frozen, feats, lengths, rng):
        del rng
        weights = {"encoder": frozen["encoder"], "projector": params["audio_projection"]}
        return encode(weights, feats, lengths, speech.encoder, speech.projector)[0]

    return SpeechEncoder(embed, {"audio_projection": speech.params["projector"]},
                         {"encoder": speech.params["encoder"]}, max_audios, max_frames)


def speech_input_from_config(cfg: ml_collections.ConfigDict) -> SpeechInput:
    """The `speech_in.SpeechInput` of `speech.path`: an Omni-Diffusion checkpoint (encoder and projector; a
    reference folder or its import), or a standalone SenseVoiceSmall (folder or model.pt beside am.mvn) with a
    fresh projector (Linear N(0, 0.02), LayerNorm 1/0, as the reference initialises a missing one)."""
    if not cfg.speech.path:
        raise ValueError(f"data.max_audios is {cfg.data.max_audios}: user speech needs speech.path, a checkpoint "
                         "with the SenseVoice encoder (an Omni-Diffusion folder or SenseVoiceSmall's model.pt)")
    path = Path(cfg.speech.path)
    if path.suffix == ".pt" or (path / "model.pt").exists():
        encoder_cfg = sensevoice_small_config(path)  # the shape the weights are loaded with (config.yaml)
        encoder, cmvn = load_sensevoice_small(path, encoder_cfg)
        proj_cfg = projector.ProjectorConfig.omni_diffusion(hidden_size=cfg.model.hidden_size)
        params = {"encoder": encoder, "projector": projector.init_params(proj_cfg, cfg.init.seed)}
        return SpeechInput(encoder_cfg, proj_cfg, params, cmvn)
    return load_speech(path, dream_config(cfg).param_dtype)


def speech_encoder_from_config(cfg: ml_collections.ConfigDict) -> SpeechEncoder:
    """`speech_encoder` around `speech_input_from_config(cfg)`; a projector in the run's initial parameters
    replaces the loaded one."""
    return speech_encoder(speech_input_from_config(cfg), cfg.data.max_audios, cfg.data.max_audio_frames)


__all__ = ["speech_encoder", "speech_input_from_config", "speech_encoder_from_config"]
