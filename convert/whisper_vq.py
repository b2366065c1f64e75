"""Key map and config reader for the GLM-4-Voice speech tokenizer (`THUDM/glm-4-voice-tokenizer`).

Two layouts are accepted (GLM-4-Voice `speech_tokenizer/modeling_whisper.py` names):
  * the released `model.safetensors`, saved from `WhisperVQEncoder`: keys without a prefix, layers 0..15, the
    codebook, `embed_positions2` and the EMA buffers;
  * a full `WhisperVQForConditionalGeneration` checkpoint: the encoder under `model.encoder.` with all 32 layers
    and a final `layer_norm`, plus the text decoder. Only the encoder's first `quantize_position` layers are read.
Per-layer keys stack onto our scanned `layers` axis; Linear weights are transposed, Conv1d kernels reordered.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnidiff_jax.convert.keymap import CONV1D, IDENTITY, LINEAR, KeyMap, Rule, flatten
from omnidiff_jax.convert.sources import CheckpointError, Source, open_source, read_json
from omnidiff_jax.models import abstract_params
from omnidiff_jax.models.whisper_vq import WhisperVQConfig, WhisperVQEncoder

log = logging.getLogger(__name__)

FULL_MODEL_PREFIX = "model.encoder."

# config.json settings this port implements (anything else is a different network).
_REQUIRED_SETTINGS = {
    "pooling_type": "avg",
    "encoder_causal_convolution": True,
    "encoder_causal_attention": False,
    "quantize_causal_encoder": False,
    "activation_function": "gelu",
    "scale_embedding": False,
}


def whisper_vq_rules() -> tuple[Rule, ...]:
    layer = "layers.{i}."
    rules = [
        Rule("conv1.weight", "conv1/kernel", CONV1D),
        Rule("conv1.bias", "conv1/bias", IDENTITY),
        Rule("conv2.weight", "conv2/kernel", CONV1D),
        Rule("conv2.bias", "conv2/bias", IDENTITY),
        Rule("embed_positions.weight", "embed_positions/embedding", IDENTITY),
        Rule("codebook.weight", "codebook/embedding", IDENTITY),
    ]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
        path = "layers/" + name.replace(".", "/")
        rules.append(Rule(layer + name + ".weight", path + "/kernel", LINEAR))
        if name != "self_attn.k_proj":  # k_proj has no bias
            rules.append(Rule(layer + name + ".bias", path + "/bias", IDENTITY))
    for name in ("self_attn_layer_norm", "final_layer_norm"):
        rules.append(Rule(layer + name + ".weight", f"layers/{name}/scale", IDENTITY))
        rules.append(Rule(layer + name + ".bias", f"layers/{name}/bias", IDENTITY))
    return tuple(rules)


def whisper_vq_keymap() -> KeyMap:
    """All encoder keys up to the quantizer; the EMA buffers, `embed_positions2` and a final LayerNorm are dropped."""
    return KeyMap(whisper_vq_rules(), drop=(
        (r"ema_(count|weight)", "codebook training statistics; codebook.weight already holds their ratio"),
        (r"embed_positions2\.weight", "positions added after the quantizer, read only by layers that follow it "
                                      "(none in the encoder-only tokenizer)"),
        (r"layer_norm\.(weight|bias)", "final LayerNorm of the full encoder, which sits after the quantizer"),
    ))


def encoder_view(source: Source, config: WhisperVQConfig) -> Source:
    """The released layout as is; for a full-model checkpoint, its encoder keys up to the quantizer, unprefixed."""
    if not any(k.startswith(FULL_MODEL_PREFIX) for k in source):
        return source
    refs, beyond, other = {}, 0, 0
    for key, ref in source.items():
        if not key.startswith(FULL_MODEL_PREFIX):
            other += 1
            continue
        key = key[len(FULL_MODEL_PREFIX):]
        m = re.match(r"layers\.(\d+)\.", key)
        if m and int(m.group(1)) >= config.num_layers:
            beyond += 1
            continue
        refs[key] = ref
    log.info("%s: full-model layout; reading %s*, leaving out %d tensors of encoder layers >= %d (after the "
             "quantizer) and %d tensors outside the encoder", source.description, FULL_MODEL_PREFIX, beyond,
             config.num_layers, other)
    return Source(refs, f"{source.description} ({FULL_MODEL_PREFIX}*)")


def read_config(folder: str | Path) -> WhisperVQConfig:
    """Parses the reference `config.json` (a `WhisperVQConfig`), refusing settings this port does not implement."""
    path = Path(folder) / "config.json"
    raw = read_json(path, "no config.json (expected the THUDM/glm-4-voice-tokenizer folder layout)")
    needed = ("d_model", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins", "max_source_positions",
              "pooling_kernel_size", "pooling_position", "quantize_position", "quantize_vocab_size",
              "quantize_causal_block_size")
    absent = [k for k in needed if raw.get(k) is None]
    if absent:
        raise CheckpointError(f"{path}: missing or null field(s) {', '.join(absent)}")
    for key, want in _REQUIRED_SETTINGS.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{path}: {key}={raw[key]!r} is not supported (this port implements {want!r})")
    if raw["pooling_position"] != raw["quantize_position"]:
        raise CheckpointError(f"{path}: pooling_position {raw['pooling_position']} differs from quantize_position "
                              f"{raw['quantize_position']}; this port pools right before the quantizer")
    try:
        return WhisperVQConfig(
            d_model=raw["d_model"], num_heads=raw["encoder_attention_heads"], ffn_dim=raw["encoder_ffn_dim"],
            num_layers=raw["quantize_position"], codebook_size=raw["quantize_vocab_size"],
            num_mel_bins=raw["num_mel_bins"], max_source_positions=raw["max_source_positions"],
            pooling_kernel_size=raw["pooling_kernel_size"], block_size=raw["quantize_causal_block_size"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def whisper_vq_target(config: WhisperVQConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the encoder's float32 parameters, without allocating them."""
    mel = jnp.zeros((1, 2 * config.pooling_kernel_size, config.num_mel_bins), jnp.float32)
    return flatten(nn.meta.unbox(abstract_params(WhisperVQEncoder(config), mel, jnp.ones(mel.shape[:2], bool))))


def load_checkpoint(path: str | Path) -> tuple[WhisperVQConfig, dict]:
    """Reads a tokenizer folder (config.json + safetensors) or one weights file next to its config.json.

    Returns (config, float32 parameter tree). Raises CheckpointError / ConversionError naming what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    config = read_config(path if path.is_dir() else path.parent)
    source = encoder_view(open_source(path), config)
    return config, whisper_vq_keymap().load(source, whisper_vq_target(config), dtype="float32")
