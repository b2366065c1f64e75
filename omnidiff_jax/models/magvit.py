"""MAGVIT-v2 image tokenizer (showlab/magvitv2, as used by Show-o and Omni-Diffusion), in Flax Linen.

Follows Omni-Diffusion `models/magvit/modeling_magvitv2.py`. Despite the name it is a taming-transformers VQGAN conv
stack with a 13-bit lookup-free quantizer (LFQ):

    z     = Encoder(x)                    x [B, H, W, 3] in [-1, 1]  ->  z [B, H/16, W/16, 13]
    bit_c = [z_c > 0]                     exactly 0 counts as negative
    code  = sum_c bit_c * 2^(12 - c)      channel 0 is the most significant bit; codes in [0, 8192)
    x'    = Decoder(2 * bits - 1)         raw output, nominally in [-1, 1] (no tanh, no clamp)

Encoder: conv_in, then per level `num_res_blocks` ResnetBlocks and (except at the last level) a stride-2
Downsample, then the mid block (ResnetBlock, single-head AttnBlock, ResnetBlock), GroupNorm, swish, conv_out and
the 1x1 `quant_conv`. Decoder: the 1x1 `post_quant_conv`, conv_in, the mid block, then the levels from the
deepest up, each followed (except level 0) by a nearest x2 Upsample, and GroupNorm, swish, conv_out. There is no
attention outside the mid blocks: the reference's `attn_resolutions=[5]` never matches a level resolution.

Everything is NHWC. Parameter paths mirror the reference state_dict (`encoder/down_1_block_0/nin_shortcut`
for `encoder.down.1.block.0.nin_shortcut`), see `omnidiff_jax.convert.magvit`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnidiff_jax.sharding import constrain

CODE_BITS = 13  # latent channels = LFQ bits
CODEBOOK_SIZE = 2 ** CODE_BITS  # 8192
NORM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class MagvitConfig:
    """Channel widths and depths of the encoder and decoder. The defaults are the released showlab/magvitv2."""

    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            mult, blocks = getattr(self, f"{side}_ch_mult"), getattr(self, f"{side}_num_res_blocks")
            if len(mult) != len(blocks) or not mult:
                raise ValueError(f"{side}_ch_mult {mult} and {side}_num_res_blocks {blocks} must have the same, "
                                 "non-zero length")
            if any((self.ch * m) % NORM_GROUPS for m in mult):
                raise ValueError(f"every {side} width ch * mult must be a multiple of {NORM_GROUPS} (GroupNorm "
                                 f"groups); got ch={self.ch}, {side}_ch_mult={mult}")

    @classmethod
    def tiny(cls) -> "MagvitConfig":
        """Five levels (so still x16 down/up sampling), widths 32/64, one or two blocks per level: for tests."""
        return cls(ch=32, encoder_ch_mult=(1, 2, 2, 2, 2), encoder_num_res_blocks=(1, 2, 1, 1, 1),
                   decoder_ch_mult=(1, 1, 2, 2, 2), decoder_num_res_blocks=(1, 1, 1, 2, 1))

    @property
    def downsample_factor(self) -> int:
        """Image pixels per code along each side (16 for the released model)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


def _conv(features: int, kernel: int, name: str, strides: int = 1, padding=None) -> nn.Conv:
    """A Conv2d with bias, zero-padded by kernel // 2 on each side unless `padding` ((top, bottom), (left, right))."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, name=name)


def _norm(name: str) -> nn.GroupNorm:
    # Two-pass variance: matches torch's GroupNorm more closely than E[x^2] - E[x]^2.
    return nn.GroupNorm(num_groups=NORM_GROUPS, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))); a 1x1 `nin_shortcut` when the width changes."""

    features: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.features, 3, "conv1")(nn.swish(_norm("norm1")(x)))
        h = _conv(self.features, 3, "conv2")(nn.swish(_norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        h = _norm("norm")(x)
        q, k, v = (_conv(c, 1, name)(h).reshape(b, height * width, c) for name in ("q", "k", "v"))
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c ** -0.5, axis=-1)  # [B, HW, HW]
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
        return x + _conv(c, 1, "proj_out")(out)


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, name="block_1")(x)
        x = AttnBlock(name="attn_1")(x)
        return ResnetBlock(c, name="block_2")(x)


def downsample(x, name: str):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv (halves even sizes exactly)."""
    return _conv(x.shape[-1], 3, name, strides=2, padding=((0, 1), (0, 1)))(x)


def upsample(x, name: str):
    """Nearest-neighbour x2 (each pixel repeated 2x2), then a 3x3 conv."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, name)(x)


class Encoder(nn.Module):
    """Image [B, H, W, 3] in [-1, 1] -> continuous latents [B, H/f, W/f, 13] (quant_conv included)."""

    config: MagvitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = constrain(x, ("activation_batch", None, None, None))
        h = _conv(cfg.ch, 3, "conv_in")(x)
        last = len(cfg.encoder_ch_mult) - 1
        for level, (mult, blocks) in enumerate(zip(cfg.encoder_ch_mult, cfg.encoder_num_res_blocks)):
            for j in range(blocks):
                h = ResnetBlock(cfg.ch * mult, name=f"down_{level}_block_{j}")(h)
            if level != last:
                h = downsample(h, f"down_{level}_downsample")
        h = MidBlock(name="mid")(h)
        h = _conv(CODE_BITS, 3, "conv_out")(nn.swish(_norm("norm_out")(h)))
        return _conv(CODE_BITS, 1, "quant_conv")(h)


class Decoder(nn.Module):
    """Quantized latents [B, h, w, 13] (entries +-1) -> image [B, h*f, w*f, 3], raw (nominally [-1, 1])."""

    config: MagvitConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        z = constrain(z, ("activation_batch", None, None, None))
        h = _conv(CODE_BITS, 1, "post_quant_conv")(z)
        h = _conv(cfg.ch * cfg.decoder_ch_mult[-1], 3, "conv_in")(h)
        h = MidBlock(name="mid")(h)
        for level in reversed(range(len(cfg.decoder_ch_mult))):
            for j in range(cfg.decoder_num_res_blocks[level]):
                h = ResnetBlock(cfg.ch * cfg.decoder_ch_mult[level], name=f"up_{level}_block_{j}")(h)
            if level != 0:
                h = upsample(h, f"up_{level}_upsample")
        return _conv(3, 3, "conv_out")(nn.swish(_norm("norm_out")(h)))


def lfq_codes(z: jax.Array) -> jax.Array:
    """Latents [..., h, w, 13] -> codes [..., h*w] int32, row-major over (h, w); channel 0 is the MSB."""
    powers = 2 ** jnp.arange(CODE_BITS - 1, -1, -1, dtype=jnp.int32)  # [4096, ..., 1]
    codes = jnp.sum((z > 0).astype(jnp.int32) * powers, axis=-1)
    return codes.reshape(*codes.shape[:-2], -1)


def lfq_latents(codes: jax.Array, height: int, width: int) -> jax.Array:
    """Codes [..., h*w] -> quantized latents [..., h, w, 13] in {-1, +1} (the LFQ codebook rows)."""
    bits = (codes[..., None] >> jnp.arange(CODE_BITS - 1, -1, -1, dtype=codes.dtype)) & 1
    return (2 * bits - 1).astype(jnp.float32).reshape(*codes.shape[:-1], height, width, CODE_BITS)


class Magvit(nn.Module):
    """Encoder, LFQ and decoder. `encode` gives codes, `decode` images; `latents` gives the encoder output z."""

    config: MagvitConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def latents(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> z [B, H/16, W/16, 13] (before quantization)."""
        return self.encoder(images)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> codes [B, (H/16) * (W/16)] int32 in [0, 8192)."""
        return lfq_codes(self.encoder(images))

    def decode(self, codes: jax.Array, height: int, width: int) -> jax.Array:
        """codes [B, height * width] -> images [B, 16 * height, 16 * width, 3], raw decoder output."""
        return self.decoder(lfq_latents(codes, height, width))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction: decode(encode(images)) (used to initialise both halves at once)."""
        z = self.encoder(images)
        return self.decoder(lfq_latents(lfq_codes(z), z.shape[1], z.shape[2]))
