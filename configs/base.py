"""Shared builder for model configs: the Dream shape plus a consistent token id layout and a mesh."""

import ml_collections

from omnidiff_jax.vocab import TokenLayout


def model_config(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 num_text: int, num_audio_codes: int, num_image_codes: int, rope_theta: float = 1_000_000.0,
                 dtype: str = "float32") -> ml_collections.ConfigDict:
    layout = TokenLayout(num_text, num_audio_codes, num_image_codes)
    cfg = ml_collections.ConfigDict()
    cfg.vocab = ml_collections.ConfigDict(dict(
        num_text=num_text, num_audio_codes=num_audio_codes, num_image_codes=num_image_codes))
    cfg.model = ml_collections.ConfigDict(dict(
        vocab_size=layout.vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, rope_theta=rope_theta, rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        mask_token_id=layout.mask, pad_token_id=layout.pad, dtype=dtype, param_dtype=dtype, remat_policy="none",
        attention_impl="auto"))
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return cfg
