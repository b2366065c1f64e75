"""The Dream layers run over a canvas suffix against cached prompt keys/values (the sampler's prefix cache).

Fast-dLLM-style and approximate by design: in a bidirectional model the prompt's keys and values depend on the
generated region too, so reusing them while that region is being decoded changes the logits a little. The
sampler refreshes the cache at the start of every block; within a block each step recomputes only the suffix.

    run_layers(x over [0, L))                      -> hidden, (k, v) of every layer     (a refresh)
    run_layers(x over [C, L), past = (k, v)[:, :C]) -> hidden over [C, L)               (a cached step)

The layer math is `omnidiff_jax.models.dream`'s (the same Flax submodules on the same parameters); only the
attention differs, because queries cover the suffix while keys cover prefix + suffix.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnidiff_jax.attention import xla_attention
from omnidiff_jax.models.dream import MLP, DreamConfig, RMSNorm, apply_rope, rope_cos_sin


def run_layers(cfg: DreamConfig, params: dict, x, positions, segments, past=None, past_segments=None):
    """Decoder layers + final norm over embeddings x [B, L, H] at `positions`/`segments` [B, L].

    past: optional (k, v), each [layers, B, C, Hkv, D] (RoPE applied), prepended to every layer's keys, with
    their `past_segments` [B, C]. Returns (normed hidden [B, L, H], (k, v) of x's own positions per layer).
    """
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
    norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    key_segments = segments if past is None else jnp.concatenate([past_segments, segments], axis=1)

    def dense(p, inputs, features, axis=-1):
        return nn.DenseGeneral(features, axis=axis, use_bias="bias" in p, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype).apply({"params": p}, inputs)

    def layer(x, layer_in):
        p, past_kv = layer_in
        attn = p["self_attn"]
        n = norm.apply({"params": p["input_layernorm"]}, x)
        q = apply_rope(dense(attn["q_proj"], n, (cfg.num_heads, cfg.head_dim)), cos, sin)
        k = apply_rope(dense(attn["k_proj"], n, (cfg.num_kv_heads, cfg.head_dim)), cos, sin)
        v = dense(attn["v_proj"], n, (cfg.num_kv_heads, cfg.head_dim))
        keys, values = (k, v) if past_kv is None else (jnp.concatenate([past_kv[0], k], axis=1),
                                                       jnp.concatenate([past_kv[1], v], axis=1))
        out = xla_attention(q, keys, values, segments, key_segments)
        h = x + dense(attn["o_proj"], out, cfg.hidden_size, (-2, -1))
        out = h + MLP(cfg).apply({"params": p["mlp"]}, norm.apply({"params": p["post_attention_layernorm"]}, h))
        return out, (k, v)

    x, kv = jax.lax.scan(layer, x.astype(cfg.dtype), (params["layers"], past))
    return norm.apply({"params": params["norm"]}, x), kv
