"""Key maps for the speech-input weights: the SenseVoice-Small encoder and the audio projector.

Two checkpoint layouts hold them (Omni-Diffusion `modeling_dream.py` and FunASR SenseVoiceSmall names):

- the Omni-Diffusion checkpoint: `model.audio_model.model.<SenseVoice name>` and `model.audio_projection.*`,
  beside the LLM keys (which `convert.dream` maps);
- a standalone SenseVoiceSmall folder: `model.pt` (or a `model.safetensors` state dict) with the bare
  SenseVoice names, plus `am.mvn` (CMVN).

The CTC head (`ctc.ctc_lo.*`) is dropped with a logged reason: Omni-Diffusion never uses it. Linear weights are
transposed; the depthwise FSMN conv [512, 1, 11] becomes a Flax kernel [11, 1, 512] (not flipped: both sides
cross-correlate); `encoders.{i}` and `tp_encoders.{i}` stack onto the scanned layer axis.

Parameter trees: `{"encoder": <SenseVoiceEncoder params>, "projector": <Projector params>}`;
`speech_keymap().export(tree)` writes them back under the Omni-Diffusion names.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import yaml

from omnidiff_jax.convert.keymap import CONV1D, IDENTITY, LINEAR, KeyMap, Rule, flatten
from omnidiff_jax.convert.sources import CheckpointError, Source, open_source
from omnidiff_jax.fbank import Cmvn, read_am_mvn
from omnidiff_jax.models import projector as projector_lib
from omnidiff_jax.models import sensevoice
from omnidiff_jax.models.projector import ProjectorConfig
from omnidiff_jax.models.sensevoice import SenseVoiceConfig

OMNI_ENCODER_PREFIX = "model.audio_model.model."
OMNI_PROJECTOR_PREFIX = "model.audio_projection."

_BLOCK = (
    ("self_attn.linear_q_k_v.weight", "self_attn/linear_q_k_v/kernel", LINEAR),
    ("self_attn.linear_q_k_v.bias", "self_attn/linear_q_k_v/bias", IDENTITY),
    ("self_attn.linear_out.weight", "self_attn/linear_out/kernel", LINEAR),
    ("self_attn.linear_out.bias", "self_attn/linear_out/bias", IDENTITY),
    ("self_attn.fsmn_block.weight", "self_attn/fsmn_block/kernel", CONV1D),
    ("feed_forward.w_1.weight", "feed_forward/w_1/kernel", LINEAR),
    ("feed_forward.w_1.bias", "feed_forward/w_1/bias", IDENTITY),
    ("feed_forward.w_2.weight", "feed_forward/w_2/kernel", LINEAR),
    ("feed_forward.w_2.bias", "feed_forward/w_2/bias", IDENTITY),
    ("norm1.weight", "norm1/weight", IDENTITY),
    ("norm1.bias", "norm1/bias", IDENTITY),
    ("norm2.weight", "norm2/weight", IDENTITY),
    ("norm2.bias", "norm2/bias", IDENTITY),
)


def encoder_rules(prefix: str = OMNI_ENCODER_PREFIX, dst: str = "encoder/") -> tuple[Rule, ...]:
    """SenseVoiceSmall names (after `prefix`) -> our `SenseVoiceEncoder` paths (under `dst`)."""
    rules = [Rule(prefix + "embed.weight", dst + "embed")]
    for norm in ("after_norm", "tp_norm"):
        rules += [Rule(f"{prefix}encoder.{norm}.{p}", f"{dst}{norm}/{p}") for p in ("weight", "bias")]
    for src_block, dst_block in (("encoders0.0", "encoders0"), ("encoders.{i}", "encoders"),
                                 ("tp_encoders.{i}", "tp_encoders")):
        rules += [Rule(f"{prefix}encoder.{src_block}.{s}", f"{dst}{dst_block}/{d}", t) for s, d, t in _BLOCK]
    return tuple(rules)


def projector_rules(prefix: str = OMNI_PROJECTOR_PREFIX, dst: str = "projector/") -> tuple[Rule, ...]:
    """`ResamplerProjector` names -> our `Projector` paths (`mlp.1` is the GELU and has no weights)."""
    return (
        Rule(prefix + "pre_proj_layernorm.weight", dst + "pre_proj_layernorm/weight"),
        Rule(prefix + "pre_proj_layernorm.bias", dst + "pre_proj_layernorm/bias"),
        Rule(prefix + "mlp.0.weight", dst + "linear_1/kernel", LINEAR),
        Rule(prefix + "mlp.2.weight", dst + "linear_2/kernel", LINEAR),
    )


def speech_keymap(encoder_prefix: str = OMNI_ENCODER_PREFIX,
                  projector_prefix: str | None = OMNI_PROJECTOR_PREFIX) -> KeyMap:
    """The encoder (+ projector unless `projector_prefix` is None) key map, dropping the unused CTC head."""
    rules = encoder_rules(encoder_prefix)
    if projector_prefix is not None:
        rules += projector_rules(projector_prefix)
    ctc = encoder_prefix.replace(".", r"\.") + r"ctc\..*"
    return KeyMap(rules, drop=((ctc, "SenseVoice CTC head, unused by Omni-Diffusion"),))


def speech_target(encoder: SenseVoiceConfig, projector: ProjectorConfig | None) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the speech-input parameters (the encoder alone when projector is None)."""
    tree = {"encoder": jax.eval_shape(lambda: sensevoice.init_params(encoder))}
    if projector is not None:
        tree["projector"] = jax.eval_shape(lambda: projector_lib.init_params(projector))
    return flatten(tree)


def load_speech_encoder(source: Source | str | os.PathLike, encoder: SenseVoiceConfig = SenseVoiceConfig.small(),
                        projector: ProjectorConfig | None = ProjectorConfig.omni_diffusion(),
                        encoder_prefix: str = OMNI_ENCODER_PREFIX, projector_prefix: str = OMNI_PROJECTOR_PREFIX,
                        dtype=None) -> dict:
    """Speech-input parameters `{"encoder": ..., "projector": ...}` from a checkpoint (a `Source` or a path).

    Only keys under the two prefixes are considered, so a full Omni-Diffusion checkpoint (LLM keys included)
    works as is. projector=None loads the encoder alone (standalone SenseVoiceSmall: encoder_prefix="").
    dtype: cast parameters to it (default: the checkpoint's dtype). Raises `ConversionError` listing every
    missing, unexpected or mis-shaped key.
    """
    if not isinstance(source, Source):
        source = open_source(source)
    prefixes = (encoder_prefix,) + ((projector_prefix,) if projector is not None else ())
    speech = Source({k: source[k] for k in source if k.startswith(prefixes)}, source.description)
    if not any(k.startswith(encoder_prefix) for k in speech):
        raise CheckpointError(f"{source.description}: no SenseVoice encoder keys (none start with "
                              f"{encoder_prefix!r})")
    keymap = speech_keymap(encoder_prefix, projector_prefix if projector is not None else None)
    return keymap.load(speech, speech_target(encoder, projector), dtype=dtype)


# FunASR config.yaml `encoder_conf` fields -> SenseVoiceConfig fields
_YAML_FIELDS = {"output_size": "output_size", "attention_heads": "num_heads", "linear_units": "linear_units",
                "num_blocks": "num_blocks", "tp_blocks": "tp_blocks", "kernel_size": "kernel_size"}


def _weights_file(path: Path) -> Path:
    """A standalone SenseVoiceSmall's weights: `path` itself, or the model.safetensors / model.pt in the folder."""
    if path.is_dir():
        found = [path / name for name in ("model.safetensors", "model.pt") if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: holds neither model.safetensors nor model.pt (SenseVoiceSmall weights)")
        return found[0]
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (expected SenseVoiceSmall's model.pt or a safetensors "
                              f"state dict)")
    return path


def sensevoice_small_config(path: str | os.PathLike) -> SenseVoiceConfig:
    """The encoder shape of a standalone SenseVoiceSmall (folder or weights file): from the FunASR `config.yaml`
    beside the weights (`encoder_conf`; `frontend_conf` n_mels x lfr_m for the input width) if there is one, else
    `SenseVoiceConfig.small()`. bf16, like `small()`."""
    config = _weights_file(Path(path)).parent / "config.yaml"
    if not config.exists():
        return SenseVoiceConfig.small()
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        encoder, frontend = raw.get("encoder_conf") or {}, raw.get("frontend_conf") or {}
        fields = {ours: int(encoder[theirs]) for theirs, ours in _YAML_FIELDS.items() if theirs in encoder}
        if "n_mels" in frontend and "lfr_m" in frontend:
            fields["input_size"] = int(frontend["n_mels"]) * int(frontend["lfr_m"])
        return SenseVoiceConfig.small(**fields)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config}: not a readable SenseVoiceSmall config.yaml ({e})") from None


def load_sensevoice_small(path: str | os.PathLike, config: SenseVoiceConfig | None = None,
                          dtype=None) -> tuple[dict, Cmvn]:
    """A standalone SenseVoiceSmall, without a projector. Returns (encoder params, CMVN).

    `path`: its released folder (`model.pt` + `am.mvn` + `config.yaml`), a folder holding `model.safetensors` +
    `am.mvn`, or the weights file itself (`.pt` or a `.safetensors` state dict with the bare SenseVoice names)
    with `am.mvn` beside it. config: the encoder's shape (default: `sensevoice_small_config(path)`). The CTC
    head, if present, is dropped.
    """
    weights = _weights_file(Path(path))
    mvn = weights.parent / "am.mvn"
    if not mvn.exists():
        raise CheckpointError(f"{mvn}: does not exist (SenseVoiceSmall ships its CMVN statistics as am.mvn "
                              f"beside its weights)")
    config = sensevoice_small_config(path) if config is None else config
    params = load_speech_encoder(weights, config, None, encoder_prefix="", dtype=dtype)
    return params["encoder"], read_am_mvn(mvn)


__all__ = ["OMNI_ENCODER_PREFIX", "OMNI_PROJECTOR_PREFIX", "encoder_rules", "projector_rules", "speech_keymap",
           "speech_target", "load_speech_encoder", "load_sensevoice_small", "sensevoice_small_config"]
