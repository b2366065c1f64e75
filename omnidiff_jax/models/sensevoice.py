"""The SenseVoice-Small encoder (FunASR `SenseVoiceEncoderSmall` + the 4 prompt rows of `SenseVoiceSmall`), in Flax.

Follows Omni-Diffusion `modeling_sensevoice.py` (FunASR SenseVoiceSmall). Input: LFR + CMVN features [N, T, 560]
and their lengths. Output: [N, T+4, 512] and lengths T+4:

    x = concat(embed[0, 1, 2, 15], feats)          language "auto", event, emotion, "woitn" prompt rows
    x = x * √512 + PE(positions 1 .. T+4)           sinusoidal, 280 sin dims then 280 cos dims
    x = encoders0(x)                                SANM block 560 -> 512, no residual around attention
    x = encoders[0..48](x); x = after_norm(x)
    x = tp_encoders[0..19](x); x = tp_norm(x)

    SANM block (pre-norm):  x = x + attn(norm1(x)); x = x + w_2(relu(w_1(norm2(x))))
    attn(h):  q, k, v = split(linear_q_k_v(h))
              fsmn = (depthwise_conv11(v·m) + v·m)·m         FSMN memory, zero padding 5 | 5, no bias
              linear_out(softmax(q·kᵀ/√d_k, keys masked)·v) + fsmn

`m` is the length mask: padded keys get no attention weight and padded frames enter the FSMN as zeros, so every
clip in a batch gets what it would get alone, up to float rounding (padded rows of the output are junk). LayerNorms
run in fp32 with eps 1e-5 and cast back; linear layers round once, as PyTorch's (`layers.Dense`).

Numerics follow `dtype`. bfloat16 is the reference's run: the features are rounded to bf16 (as its `AudioEncoder`
does) and the position table is built in bf16, rounding after every op, bit for bit (the distribution the LLM was
trained on). float32 is float32 end to end: features as given, the exact table. `position_encoding` ("bf16" or
"float32") overrides the table alone. Dropout (rate 0.1 in the reference's `config.yaml`, active in its
fine-tuning) is not modelled: the encoder is frozen and runs deterministically. Encoder blocks are scanned
(parameters stacked on a leading axis).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from omnidiff_jax.models.layers import Dense, round_to


@dataclasses.dataclass(frozen=True)
class SenseVoiceConfig:
    """Shape and numerics of the encoder. `small()` is SenseVoiceSmall as Omni-Diffusion runs it."""

    input_size: int = 560  # LFR features: 80 mel bins x 7 frames
    output_size: int = 512
    num_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50  # encoders0 plus num_blocks - 1 `encoders`
    tp_blocks: int = 20
    kernel_size: int = 11  # FSMN memory, centred (sanm_shift 0)
    num_embed: int = 16  # rows of the prompt table `embed`
    prompt_rows: tuple[int, ...] = (0, 1, 2, 15)  # language auto, event, emotion, text norm "woitn"
    position_encoding: str = "auto"  # "bf16": the reference's rounded table; "float32": exact; "auto": as dtype
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.output_size % self.num_heads:
            raise ValueError(f"output_size {self.output_size} is not a multiple of num_heads {self.num_heads}")
        if self.input_size % 2:
            raise ValueError(f"input_size {self.input_size} must be even (half sin, half cos position dims)")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {self.kernel_size} must be odd (a centred FSMN window)")
        if self.num_blocks < 2 or self.tp_blocks < 1:
            raise ValueError(f"need num_blocks >= 2 (encoders0 + encoders) and tp_blocks >= 1, got "
                             f"{self.num_blocks} and {self.tp_blocks}")
        if not all(0 <= r < self.num_embed for r in self.prompt_rows):
            raise ValueError(f"prompt_rows {self.prompt_rows} must index the {self.num_embed}-row embed table")
        if self.position_encoding not in ("auto", "bf16", "float32"):
            raise ValueError(f"position_encoding must be 'auto', 'bf16' or 'float32', got {self.position_encoding!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")

    @classmethod
    def small(cls, **changes: Any) -> "SenseVoiceConfig":
        """SenseVoiceSmall (hub config.yaml), bf16 like the Omni-Diffusion runtime."""
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes: Any) -> "SenseVoiceConfig":
        """A 2+1+2-block, 32-wide encoder for tests (same 560-wide input, so real features run through it)."""
        base = dict(output_size=32, num_heads=2, linear_units=64, num_blocks=3, tp_blocks=2, dtype="float32",
                    param_dtype="float32")
        return cls(**{**base, **changes})

    @property
    def bf16_positions(self) -> bool:
        """Whether the position table is the reference's bf16 one ("auto": when computing in bf16)."""
        return self.position_encoding == "bf16" or (self.position_encoding == "auto" and self.dtype == "bfloat16")

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_rows)

    def replace(self, **changes: Any) -> "SenseVoiceConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=64)
def position_table(length: int, depth: int, bf16: bool) -> np.ndarray:
    """Sinusoidal table [length, depth] for positions 1..length: sin(p·inv) | cos(p·inv), inv[k] = e^(-k·inc).

    bf16=True rounds to bf16 after every op in the reference's order (log of bf16 10000, / (depth/2 - 1),
    bf16 arange, × -inc, exp, bf16 positions ×, sin, cos), computed on the host so XLA cannot fuse the roundings
    away. Returns float32 holding bf16-representable values in that case.
    """
    half = depth // 2
    if not bf16:
        inc = np.float32(np.log(np.float32(10000.0)) / np.float32(half - 1))
        inv = np.exp(np.arange(half, dtype=np.float32) * -inc)
        angle = np.arange(1, length + 1, dtype=np.float32)[:, None] * inv[None, :]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)
    r = lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    inc = r(r(np.log(r(10000.0))) / np.float32(half - 1))
    inv = r(np.exp(r(r(np.arange(half)) * -inc)))
    angle = r(r(np.arange(1, length + 1))[:, None] * inv[None, :])
    return np.concatenate([r(np.sin(angle)), r(np.cos(angle))], axis=1)


def scale(x: jax.Array, factor: float) -> jax.Array:
    """x · factor computed in fp32 and rounded once to x.dtype (how PyTorch multiplies by a Python scalar)."""
    return (x.astype(jnp.float32) * np.float32(factor)).astype(x.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm computed in fp32 (input and weights upcast), eps 1e-5, cast back to the input dtype."""

    param_dtype: Any
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (width,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias).astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Per-channel 1-D cross-correlation over time with zero padding (k-1)/2 on each side, no bias.

    kernel [k, 1, C] (the WIO layout of a grouped conv). Written as k shifted multiply-adds accumulated in fp32:
    XLA's CPU grouped convolution is ~50x slower, and this form fuses on every backend.
    """

    kernel_size: int
    param_dtype: Any

    @nn.compact
    def __call__(self, x):  # [N, T, C]
        k, t = self.kernel_size, x.shape[1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, 1, x.shape[-1]), self.param_dtype)
        padded = jnp.pad(x.astype(jnp.float32), ((0, 0), ((k - 1) // 2, (k - 1) // 2), (0, 0)))
        out = sum(padded[:, j:j + t] * kernel[j, 0].astype(jnp.float32) for j in range(k))
        return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------------- blocks

class SANMAttention(nn.Module):
    """Multi-head self-attention plus the FSMN memory over the values (`MultiHeadedAttentionSANM`)."""

    config: SenseVoiceConfig

    @nn.compact
    def __call__(self, x, mask):  # x [N, T, in], mask [N, T] bool
        cfg = self.config
        n, t, _ = x.shape
        d, h = cfg.output_size, cfg.num_heads
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        q, k, v = jnp.split(dense(3 * d, name="linear_q_k_v")(x), 3, axis=-1)  # each [N, T, d]

        m = mask[..., None].astype(v.dtype)
        v_m = v * m
        fsmn = (DepthwiseConv(cfg.kernel_size, cfg.param_dtype, name="fsmn_block")(v_m) + v_m) * m

        heads = lambda a: a.reshape(n, t, h, d // h)  # noqa: E731  head-major features
        q = scale(heads(q), (d // h) ** -0.5)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, heads(k))
        scores = jnp.where(mask[:, None, None, :], scores.astype(jnp.float32), -jnp.inf)  # every row keeps 4 keys
        attn = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("nhqk,nkhd->nqhd", attn, heads(v)).reshape(n, t, d)
        return round_to(dense(d, name="linear_out")(ctx) + fsmn, fsmn.dtype)  # rounded: see `SANMBlock`


class FeedForward(nn.Module):
    config: SenseVoiceConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        return dense(cfg.output_size, name="w_2")(nn.relu(dense(cfg.linear_units, name="w_1")(x)))


class SANMBlock(nn.Module):
    """`EncoderLayerSANM` with normalize_before; `residual=False` only for encoders0 (its width changes)."""

    config: SenseVoiceConfig
    residual: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        y = SANMAttention(cfg, name="self_attn")(LayerNorm(cfg.param_dtype, name="norm1")(x), mask)
        # This sum, the attention's output (linear_out + fsmn) and the encoder's input (x·√d + PE) go through
        # `round_to`: XLA's default compile would carry them in float32 into the next add or LayerNorm where PyTorch
        # has a bf16 tensor (end to end, 16 % of the outputs bit-identical to the bf16 reference's instead of 49 %).
        x = round_to(x + y, y.dtype) if self.residual else y
        x = x + FeedForward(cfg, name="feed_forward")(LayerNorm(cfg.param_dtype, name="norm2")(x))
        return x, None


# --------------------------------------------------------------------------------------------------- encoder

class SenseVoiceEncoder(nn.Module):
    """Features [N, T, 560] + lengths [N] -> (encodings [N, T+4, 512] in the compute dtype, lengths + 4)."""

    config: SenseVoiceConfig

    @nn.compact
    def __call__(self, feats, lengths):
        cfg = self.config
        n, t, _ = feats.shape
        embed = self.param("embed", nn.initializers.normal(1.0), (cfg.num_embed, cfg.input_size), cfg.param_dtype)
        prompts = jnp.broadcast_to(embed[np.array(cfg.prompt_rows)].astype(cfg.dtype),
                                   (n, cfg.num_prompts, cfg.input_size))
        x = jnp.concatenate([prompts, feats.astype(cfg.dtype)], axis=1)  # bf16: rounded, as the reference's
        lengths = lengths.astype(jnp.int32) + cfg.num_prompts
        mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [N, T+4]

        x = scale(x, math.sqrt(cfg.output_size))
        pe = position_table(x.shape[1], cfg.input_size, cfg.bf16_positions)
        x = round_to(x + jnp.asarray(pe, cfg.dtype), cfg.dtype)  # rounded: see `SANMBlock`

        stack = lambda count, name: nn.scan(  # noqa: E731  `count` blocks, parameters stacked
            SANMBlock, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
            length=count)(cfg, name=name)
        x, _ = SANMBlock(cfg, residual=False, name="encoders0")(x, mask)
        x, _ = stack(cfg.num_blocks - 1, "encoders")(x, mask)
        x = LayerNorm(cfg.param_dtype, name="after_norm")(x)
        x, _ = stack(cfg.tp_blocks, "tp_encoders")(x, mask)
        x = LayerNorm(cfg.param_dtype, name="tp_norm")(x)
        return x, lengths


@functools.partial(jax.jit, static_argnames="config")
def init_params(config: SenseVoiceConfig, seed: int = 0) -> dict:
    """Random parameters (a plain nested dict) for `config` (jitted: an eager init runs the encoder op by op and
    compiles its layer scan anew on every call, several times slower)."""
    feats, lengths = jnp.zeros((1, 2, config.input_size)), jnp.array([2])
    return SenseVoiceEncoder(config).init(jax.random.key(seed), feats, lengths)["params"]


__all__ = ["SenseVoiceConfig", "SenseVoiceEncoder", "LayerNorm", "position_table", "init_params", "scale"]
