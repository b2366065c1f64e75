"""Key map between the reference `DreamModel` state_dict and our Dream parameter tree, and its config.json.

Every LLM key of the released Omni-Diffusion checkpoint (Dream `modeling_dream.py` names) maps here; per-layer keys
stack onto the scanned `layers` axis. Linear weights are transposed, except the output head, kept [vocab, hidden] (see
`models.dream`); q/k/v/o are reshaped to explicit head axes. The speech-input keys (`model.audio_model.*`,
`model.audio_projection.*`) belong to the speech front end and are accounted for there.
"""

from __future__ import annotations

from pathlib import Path

from omnidiff_jax.convert.keymap import IDENTITY, LINEAR, KeyMap, Rule, heads_bias, heads_in, heads_out
from omnidiff_jax.convert.sources import CheckpointError, read_json
from omnidiff_jax.models.dream import DreamConfig
from omnidiff_jax.vocab import DREAM_SPECIALS, OMNI_SPECIALS, TokenLayout

# The reference's remote-code entry points, written into exported config.json files.
AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}


def dream_rules(cfg: DreamConfig) -> tuple[Rule, ...]:
    h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
    layer = "model.layers.{i}."
    return (
        Rule("model.embed_tokens.weight", "embed_tokens/embedding", IDENTITY),
        Rule("model.norm.weight", "norm/weight", IDENTITY),
        Rule("lm_head.weight", "lm_head/embedding", IDENTITY),
        Rule(layer + "input_layernorm.weight", "layers/input_layernorm/weight", IDENTITY),
        Rule(layer + "post_attention_layernorm.weight", "layers/post_attention_layernorm/weight", IDENTITY),
        Rule(layer + "self_attn.q_proj.weight", "layers/self_attn/q_proj/kernel", heads_out(h, d)),
        Rule(layer + "self_attn.q_proj.bias", "layers/self_attn/q_proj/bias", heads_bias(h, d)),
        Rule(layer + "self_attn.k_proj.weight", "layers/self_attn/k_proj/kernel", heads_out(kv, d)),
        Rule(layer + "self_attn.k_proj.bias", "layers/self_attn/k_proj/bias", heads_bias(kv, d)),
        Rule(layer + "self_attn.v_proj.weight", "layers/self_attn/v_proj/kernel", heads_out(kv, d)),
        Rule(layer + "self_attn.v_proj.bias", "layers/self_attn/v_proj/bias", heads_bias(kv, d)),
        Rule(layer + "self_attn.o_proj.weight", "layers/self_attn/o_proj/kernel", heads_in(h, d)),
        Rule(layer + "mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", LINEAR),
        Rule(layer + "mlp.up_proj.weight", "layers/mlp/up_proj/kernel", LINEAR),
        Rule(layer + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel", LINEAR),
    )


def dream_keymap(cfg: DreamConfig) -> KeyMap:
    """The LLM-only key map (the speech-input keys are dropped, with that reason, when present)."""
    return KeyMap(dream_rules(cfg), drop=(
        (r"model\.audio_model\..*", "speech-input encoder, not part of the LLM"),
        (r"model\.audio_projection\..*", "speech-input projector, not part of the LLM"),
    ))


# config.json fields we read, by the type they must have (sizes positive, token ids >= 0)
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "max_position_embeddings")
_TOKEN_IDS = ("mask_token_id", "pad_token_id")
_REALS = ("rope_theta", "rms_norm_eps")


def check_field_types(raw: dict, path: Path) -> None:
    """Raises CheckpointError naming the file, key and value of the first config.json field of the wrong type."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(raw).__name__}, not an object of config fields")
    for key in (*_SIZES, *_TOKEN_IDS, *_REALS):
        if key not in raw:
            continue
        value, real = raw[key], key in _REALS
        integer = isinstance(value, int) and not isinstance(value, bool)
        if real and not (integer or isinstance(value, float)) or not real and not integer:
            raise CheckpointError(f"{path}: {key} must be {'a number' if real else 'an integer'}, got {value!r}")
        if key in _SIZES and value < 1 or key in _TOKEN_IDS and value < 0:
            raise CheckpointError(f"{path}: {key} must be {'positive' if key in _SIZES else '>= 0'}, got {value!r}")


def read_hf_config(folder: str | Path) -> tuple[DreamConfig, TokenLayout, dict]:
    """Parses a reference `config.json` into (DreamConfig, TokenLayout, raw dict). Raises naming what is wrong."""
    path = Path(folder) / "config.json"
    raw = read_json(path, "not a Dream checkpoint (no config.json)")
    check_field_types(raw, path)
    if raw.get("model_type") != "Dream":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'Dream'")
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [k for k in needed if k not in raw]
    if absent:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(absent)}")
    dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(raw.get("torch_dtype"), "float32")
    cfg = DreamConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        intermediate_size=raw["intermediate_size"], rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=raw.get("max_position_embeddings", 131072),
        mask_token_id=raw.get("mask_token_id", 151666), pad_token_id=raw.get("pad_token_id", 151643), dtype=dtype,
        param_dtype=dtype)
    layout = layout_from_hf(raw, path)
    return cfg, layout, raw


def layout_from_hf(raw: dict, path: Path) -> TokenLayout:
    """The token layout: our `omnidiff_vocab` field if present, else the released model's code counts."""
    if "omnidiff_vocab" in raw:
        try:
            layout = TokenLayout(**raw["omnidiff_vocab"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad omnidiff_vocab field ({e})") from None
    else:
        num_text = raw.get("pad_token_id", 151643)
        rest = raw["vocab_size"] - num_text - len(DREAM_SPECIALS) - len(OMNI_SPECIALS)
        layout = TokenLayout(num_text, 16384, rest - 16384)
        if layout.num_image_codes < 0:
            raise CheckpointError(f"{path}: vocab_size {raw['vocab_size']} leaves no room for the 16384 speech "
                                  "codes; add an omnidiff_vocab field giving the token layout")
    if layout.vocab_size != raw["vocab_size"] or layout.mask != raw.get("mask_token_id", layout.mask):
        raise CheckpointError(f"{path}: token layout {layout} does not fit vocab_size {raw['vocab_size']} and "
                              f"mask_token_id {raw.get('mask_token_id')}")
    return layout


def hf_config(cfg: DreamConfig, layout: TokenLayout, torch_dtype: str) -> dict:
    """A reference-style config.json dict for `cfg` (used by the exporter and by tests' fixtures)."""
    return {
        "architectures": ["DreamModel"], "auto_map": AUTO_MAP, "model_type": "Dream",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "max_position_embeddings": cfg.max_position_embeddings,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "torch_dtype": torch_dtype,
        "mask_token_id": cfg.mask_token_id, "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.pad_token_id, "use_cache": False, "use_sliding_window": False, "sliding_window": None,
        "omnidiff_vocab": {"num_text": layout.num_text, "num_audio_codes": layout.num_audio_codes,
                           "num_image_codes": layout.num_image_codes},
    }
