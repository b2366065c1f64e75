"""The GLM-4-Voice speech tokenizer network: the first 16 layers of a Whisper-large-v3 encoder plus a VQ codebook.

Follows GLM-4-Voice `speech_tokenizer/modeling_whisper.py`. From a 100 Hz log-mel spectrogram to 12.5 Hz code ids:

    x = gelu(conv1(mel))          causal conv, kernel 3, stride 1 (left zero-pad 2)        100 Hz
    x = gelu(conv2(x))            causal conv, kernel 3, stride 2 (left zero-pad 2)         50 Hz
    x = x + embed_positions[:T']  learned positions
    16 x pre-LN layer:
        h = x + out_proj(attn(self_attn_layer_norm(x)))   20 heads, k_proj without bias, block-causal mask
        x = h + fc2(gelu(fc1(final_layer_norm(h))))
    x = avg_pool(x, 4)                                                                         12.5 Hz
    code = argmin_k ||c_k||^2 + ||x||^2 - 2 x.c_k            squared Euclidean against codebook [K, D]

The attention mask is block-causal: a frame sees every earlier frame and every frame of its own 200-frame (4 s)
block, counted from the start of the 30 s chunk, and never a padded frame. GELU is exact (erf) and LayerNorm
eps is 1e-5, as in PyTorch. There is no final LayerNorm (the full encoder's sits after layer 32). Every matmul
runs at `highest` precision: code ids are argmins, and TF32/bf16 passes would flip near-ties.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class WhisperVQConfig:
    """Shape of the tokenizer network. `glm4voice()` is THUDM/glm-4-voice-tokenizer; `tiny()` is for tests."""

    d_model: int
    num_heads: int
    ffn_dim: int
    num_layers: int  # the quantizer's position: only these layers exist
    codebook_size: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500  # 30 s at 50 Hz
    pooling_kernel_size: int = 4
    block_size: int = 200  # block-causal attention blocks, in 50 Hz frames
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mel_frames_per_code(self) -> int:
        """conv2 stride x pooling: 8 mel frames (80 ms at hop 160) per code."""
        return 2 * self.pooling_kernel_size

    @classmethod
    def glm4voice(cls) -> "WhisperVQConfig":
        """THUDM/glm-4-voice-tokenizer: Whisper-large-v3 geometry, layers 0-15, 16384 codes."""
        return cls(d_model=1280, num_heads=20, ffn_dim=5120, num_layers=16, codebook_size=16384)

    @classmethod
    def tiny(cls) -> "WhisperVQConfig":
        """Test-sized: width 64, 4 heads, 2 layers, 64 codes; the real front end, positions and block size."""
        return cls(d_model=64, num_heads=4, ffn_dim=128, num_layers=2, codebook_size=64)


def causal_block_mask(frame_valid: jax.Array, block_size: int) -> jax.Array:
    """[B, T] bool valid frames -> [B, T, T] bool: query i may see key j iff (j <= i or same block) and j valid."""
    t = jnp.arange(frame_valid.shape[1])
    allowed = (t[None, :] <= t[:, None]) | (t[None, :] // block_size == t[:, None] // block_size)
    return allowed[None] & frame_valid[:, None, :]


class Attention(nn.Module):
    config: WhisperVQConfig

    @nn.compact
    def __call__(self, x, mask):  # x [B, T, D], mask [B, T, T]
        cfg = self.config
        b, t, _ = x.shape
        dense = functools.partial(nn.Dense, cfg.d_model, precision=HIGHEST)
        heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)  # noqa: E731
        q = heads(dense(name="q_proj")(x)) * cfg.head_dim ** -0.5
        k = heads(dense(use_bias=False, name="k_proj")(x))
        v = heads(dense(name="v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=HIGHEST).reshape(b, t, cfg.d_model)
        return dense(name="out_proj")(out)


class EncoderLayer(nn.Module):
    config: WhisperVQConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps)
        h = x + Attention(cfg, name="self_attn")(norm(name="self_attn_layer_norm")(x), mask)
        m = nn.Dense(cfg.ffn_dim, precision=HIGHEST, name="fc1")(norm(name="final_layer_norm")(h))
        return h + nn.Dense(cfg.d_model, precision=HIGHEST, name="fc2")(nn.gelu(m, approximate=False)), None


def vector_quantize(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """x [..., D], codebook [K, D] -> int32 ids [...] of the nearest code (squared Euclidean, first on ties).

    Written as the reference's (||c||^2 + ||x||^2) - 2 x.c so that rounding, and so near-ties, go the same way.
    """
    dots = jnp.einsum("...d,kd->...k", x, codebook, precision=HIGHEST)
    dist = (jnp.sum(codebook ** 2, axis=-1) + jnp.sum(x ** 2, axis=-1, keepdims=True)) - 2.0 * dots
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


class WhisperVQEncoder(nn.Module):
    """Log-mel frames -> (pooled hidden states [B, T/8, D], code ids [B, T/8])."""

    config: WhisperVQConfig

    def setup(self):
        cfg = self.config
        conv = functools.partial(nn.Conv, cfg.d_model, kernel_size=(3,), padding=((2, 0),), precision=HIGHEST)
        self.conv1 = conv()
        self.conv2 = conv(strides=(2,))
        self.embed_positions = nn.Embed(cfg.max_source_positions, cfg.d_model)
        self.layers = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,), length=cfg.num_layers)(cfg)
        self.codebook = nn.Embed(cfg.codebook_size, cfg.d_model)

    def __call__(self, mel: jax.Array, mel_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """mel [B, T, num_mel_bins] float32 (T even); mel_valid [B, T] bool (the feature attention mask)."""
        cfg = self.config
        if mel.shape[1] % 2 or mel.shape[1] // 2 > cfg.max_source_positions:
            raise ValueError(f"mel length {mel.shape[1]} must be even and at most "
                             f"{2 * cfg.max_source_positions} frames (30 s)")
        x = nn.gelu(self.conv1(mel), approximate=False)
        x = nn.gelu(self.conv2(x), approximate=False)  # [B, T/2, D]
        x = x + self.embed_positions.embedding[:x.shape[1]]
        x, _ = self.layers(x, causal_block_mask(mel_valid[:, ::2], cfg.block_size))
        pad = -x.shape[1] % cfg.pooling_kernel_size
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        b, t, d = x.shape
        pooled = x.reshape(b, t // cfg.pooling_kernel_size, cfg.pooling_kernel_size, d).mean(axis=2)
        return pooled, vector_quantize(pooled, self.codebook.embedding)
