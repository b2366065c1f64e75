"""GLM-4-Voice flow-matching decoder (CosyVoice `MaskedDiffWithXvec`): speech codes -> 80-bin mel at 22050/256 Hz.

Follows GLM-4-Voice `flow_inference.py` and `cosyvoice/flow/`, the offline path Omni-Diffusion uses (empty prompt, zero
speaker vector):

    x   = input_embedding[codes]                                  [B, N, 512]
    h   = encoder_proj(encoder(x))                                [B, N, 80]   block rel-pos Transformer
    T   = int(float32(N) / 12.5 * 22050 / 256)                    mel_frames()
    mu  = length_regulator(nearest(h, T))                         [B, T, 80]
    spk = spk_embed_affine_layer(0)                               (= its bias)
    mel = Euler(z; v = 1.7 est(x, mu, spk) - 0.7 est(x, 0, 0))    10 steps on t = 1 - cos(pi/2 s), z ~ N(0, 1)

`Flow` holds the parameters and the network pieces (`encode`, `regulate`, `speaker`, `estimate`); `generate_mel`
is the solver loop (a `lax.scan`, one batched conditional + unconditional estimator call per step).

Batches are padded (codes to a bucket length, frames to its frame count) and the padding is masked so that each
row equals the batch-1 reference on its own: padded keys are excluded from attention, group-norm statistics cover
valid frames only, and convolutions see zeros past each row's end (the reference's own zero padding). The
reference's estimator adds its 0/1 mask to the attention scores instead of masking; with batch 1 and no padding,
the only case it runs, that is a no-op, and it is not reproduced for padded rows. Everything is channel-last.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The frame-count rule hard-codes these (flow.py: `token_len / input_frame_rate * 22050 / 256`).
SAMPLE_RATE = 22050
HOP_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Shape of the flow decoder; the defaults are the released `THUDM/glm-4-voice-decoder` (config.yaml)."""

    vocab_size: int = 16384
    input_size: int = 512  # token embedding and encoder width
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    input_frame_rate: float = 12.5  # codes per second
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    encoder_layers: int = 6
    block_size: int = 10  # encoder attention: causal across blocks of this many codes, full within one
    regulator_layers: int = 4
    channels: tuple[int, ...] = (256, 256)  # U-Net stages
    attention_heads: int = 8
    attention_head_dim: int = 64
    transformer_blocks: int = 4  # per U-Net stage
    mid_blocks: int = 12
    cfg_rate: float = 0.7  # classifier-free guidance: v = (1 + rate) v_cond - rate v_uncond
    n_timesteps: int = 10

    def __post_init__(self):
        if self.input_size % self.encoder_heads:
            raise ValueError(f"input_size {self.input_size} is not a multiple of encoder_heads {self.encoder_heads}")
        bad = [c for c in self.channels if c % 8]
        if bad or not self.channels:
            raise ValueError(f"U-Net channels {self.channels} must be non-empty multiples of 8 (GroupNorm(8))")


def mel_frames(num_codes) -> np.ndarray:
    """Mel frames for `num_codes` codes, the reference's float32 arithmetic: int(float32(N) / 12.5 * 22050 / 256).

    This is floor(N * 441 / 64) except where float32 rounds below an integer (N = 3392, 3776, 4160, ...).
    """
    n = np.asarray(num_codes, np.float32)
    frames = n / np.float32(12.5) * np.float32(SAMPLE_RATE) / np.float32(HOP_LENGTH)
    return frames.astype(np.int32)


def mish(x):
    """x tanh(softplus(x))."""
    return x * jnp.tanh(jax.nn.softplus(x))


def _masked(x, mask):
    """Zeros where mask [B, T, 1] is False (a select, so junk in padding cannot turn into NaN)."""
    return jnp.where(mask, x, 0.0)


def _layer_norm(name):
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


def _group_norm(groups, name):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False, name=name)


# --------------------------------------------------------------------------------------------------- encoder

def relative_positions(length: int, dim: int) -> jax.Array:
    """[2L-1, dim]: row m encodes relative position r = L-1-m; features 2k, 2k+1 = sin, cos(r * 10000^(-2k/dim))."""
    r = jnp.arange(length - 1, -length, -1, dtype=jnp.float32)[:, None]
    omega = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * jnp.float32(-math.log(10000.0) / dim))
    angles = r * omega
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(2 * length - 1, dim)


class BlockRelPositionAttention(nn.Module):
    """Transformer-XL attention: scores = ((q + u) k + (q + v) p_{i-j}) / sqrt(d), under a block-causal mask."""

    heads: int

    @nn.compact
    def __call__(self, x, pos_emb, allowed):
        """x [B, T, D]; pos_emb [2T-1, D] (relative positions T-1 .. -(T-1)); allowed [B, T, T] bool."""
        b, t, d = x.shape
        head_dim = d // self.heads
        proj = lambda name, bias=True: nn.DenseGeneral((self.heads, head_dim), use_bias=bias, name=name)  # noqa
        q, k, v = proj("linear_q")(x), proj("linear_k")(x), proj("linear_v")(x)  # [B, T, H, d]
        p = proj("linear_pos", False)(pos_emb)  # [2T-1, H, d]
        bias_u = self.param("pos_bias_u", nn.initializers.zeros, (self.heads, head_dim))
        bias_v = self.param("pos_bias_v", nn.initializers.zeros, (self.heads, head_dim))
        ac = jnp.einsum("bihd,bjhd->bhij", q + bias_u, k)
        bd = jnp.einsum("bihd,mhd->bhim", q + bias_v, p)  # [B, H, T, 2T-1]
        i = jnp.arange(t)
        rel = (t - 1) - i[:, None] + i[None, :]  # column of p that holds position i - j (the rel_shift)
        bd = jnp.take_along_axis(bd, jnp.broadcast_to(rel, (b, self.heads, t, t)), axis=-1)
        scores = (ac + bd) / math.sqrt(head_dim)
        allowed = allowed[:, None]
        probs = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1), 0.0)
        out = jnp.einsum("bhij,bjhd->bihd", probs, v)
        return nn.DenseGeneral(d, axis=(-2, -1), name="linear_out")(out)


class EncoderLayer(nn.Module):
    """Pre-norm: x += attn(norm_mha(x)); x += w_2(silu(w_1(norm_ff(x))))."""

    config: FlowConfig

    @nn.compact
    def __call__(self, x, pos_emb, allowed):
        cfg = self.config
        x = x + BlockRelPositionAttention(cfg.encoder_heads, name="self_attn")(_layer_norm("norm_mha")(x),
                                                                               pos_emb, allowed)
        h = nn.silu(nn.Dense(cfg.encoder_ffn, name="w_1")(_layer_norm("norm_ff")(x)))
        return x + nn.Dense(cfg.input_size, name="w_2")(h), None


class FlowEncoder(nn.Module):
    """Linear + LayerNorm embedding scaled by sqrt(D), the rel-pos layers (scanned), a final LayerNorm."""

    config: FlowConfig

    @nn.compact
    def __call__(self, x, token_mask):
        """x [B, N, D]; token_mask [B, N] bool -> [B, N, D]."""
        cfg = self.config
        n = x.shape[1]
        x = _layer_norm("embed_norm")(nn.Dense(cfg.input_size, name="embed")(x)) * math.sqrt(cfg.input_size)
        i = jnp.arange(n)
        blocks = (i[None, :] <= i[:, None]) | (i[None, :] // cfg.block_size == i[:, None] // cfg.block_size)
        allowed = token_mask[:, None, :] & blocks[None]
        layers = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.encoder_layers)(cfg, name="layers")
        x, _ = layers(x, relative_positions(n, cfg.input_size), allowed)
        return _layer_norm("after_norm")(x)


class LengthRegulator(nn.Module):
    """Nearest interpolation to T frames (PyTorch semantics), then [conv3 -> GroupNorm(1) -> Mish] x L, conv1."""

    config: FlowConfig

    @nn.compact
    def __call__(self, h, token_lengths, frame_mask):
        """h [B, N, C]; token_lengths [B]; frame_mask [B, T] bool (the first T_b frames of each row) -> [B, T, C]."""
        c = self.config.output_size
        scale = token_lengths.astype(jnp.float32) / frame_mask.sum(-1).astype(jnp.float32)  # float32(N / T)
        pos = jnp.arange(frame_mask.shape[1], dtype=jnp.float32)
        src = jnp.minimum(jnp.floor(pos[None] * scale[:, None]).astype(jnp.int32), token_lengths[:, None] - 1)
        x = jnp.take_along_axis(h, src[..., None], axis=1)
        m = frame_mask[..., None]
        for n in range(self.config.regulator_layers):
            x = nn.Conv(c, (3,), padding=[(1, 1)], name=f"conv_{n}")(_masked(x, m))
            x = mish(_group_norm(1, f"norm_{n}")(x, mask=jnp.broadcast_to(m, x.shape)))
        return _masked(nn.Conv(c, (1,), name="proj")(x), m)


# --------------------------------------------------------------------------------------------------- estimator

def timestep_embedding(t, dim: int) -> jax.Array:
    """t [B] -> [B, dim]: [sin(a), cos(a)] (concatenated), a = 1000 t exp(-k ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000) / (half - 1)))
    a = (1000 * t)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1)


class Block1D(nn.Module):
    """Mish(GroupNorm(8)(conv3(x m))) m."""

    features: int

    @nn.compact
    def __call__(self, x, m):
        x = nn.Conv(self.features, (3,), padding=[(1, 1)], name="conv")(_masked(x, m))
        return _masked(mish(_group_norm(8, "norm")(x, mask=jnp.broadcast_to(m, x.shape))), m)


class ResnetBlock1D(nn.Module):
    """block2(block1(x) + mlp(Mish(temb))) + res_conv(x m)."""

    features: int

    @nn.compact
    def __call__(self, x, m, temb):
        h = Block1D(self.features, name="block1")(x, m) + nn.Dense(self.features, name="mlp")(mish(temb))[:, None]
        return Block1D(self.features, name="block2")(h, m) + nn.Conv(self.features, (1,), name="res_conv")(
            _masked(x, m))


class TransformerBlock(nn.Module):
    """The diffusers block as Matcha uses it: x += attn(norm1(x)) (q/k/v without bias); x += ff(norm3(x)), exact
    GELU, 4x width."""

    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x, key_mask):
        """x [B, T, D]; key_mask [B, T] bool (padded frames are not attended to)."""
        d = x.shape[-1]
        h = _layer_norm("norm1")(x)
        q, k, v = (nn.DenseGeneral((self.heads, self.head_dim), use_bias=False, name=n)(h)
                   for n in ("to_q", "to_k", "to_v"))
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(self.head_dim)
        probs = jax.nn.softmax(jnp.where(key_mask[:, None, None, :], scores, -jnp.inf), axis=-1)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="to_out")(jnp.einsum("bhij,bjhd->bihd", probs, v))
        h = jax.nn.gelu(nn.Dense(4 * d, name="ff_proj")(_layer_norm("norm3")(x)), approximate=False)
        return x + nn.Dense(d, name="ff_out")(h)


class UNetStage(nn.Module):
    """A ResnetBlock1D and `transformer_blocks` transformer blocks at one resolution."""

    config: FlowConfig
    features: int

    @nn.compact
    def __call__(self, x, m, temb):
        cfg = self.config
        x = ResnetBlock1D(self.features, name="resnet")(x, m, temb)
        for k in range(cfg.transformer_blocks):
            x = TransformerBlock(cfg.attention_heads, cfg.attention_head_dim, name=f"transformer_{k}")(x, m[..., 0])
        return x, None


class Estimator(nn.Module):
    """The 1-D U-Net velocity field (Matcha `ConditionalDecoder`): down stages (stride-2 conv), mid stages (scanned),
    up stages (transposed conv) with skips, on the channel concat [x, mu, spk, cond]."""

    config: FlowConfig

    @nn.compact
    def __call__(self, x, mask, mu, t, spk, cond):
        """x, mu, cond [B, T, C]; mask [B, T] bool; t [B]; spk [B, C] -> velocity [B, T, C]."""
        cfg = self.config
        ch = cfg.channels
        temb = timestep_embedding(t, 4 * cfg.output_size)
        temb = nn.Dense(4 * ch[0], name="time_linear_2")(nn.silu(nn.Dense(4 * ch[0], name="time_linear_1")(temb)))
        h = jnp.concatenate([x, mu, jnp.broadcast_to(spk[:, None], x.shape), cond], axis=-1)
        masks, skips = [mask[..., None]], []
        for i, features in enumerate(ch):
            m = masks[-1]
            h, _ = UNetStage(cfg, features, name=f"down_{i}")(h, m, temb)
            skips.append(h)
            stride = 1 if i == len(ch) - 1 else 2
            h = nn.Conv(features, (3,), strides=(stride,), padding=[(1, 1)], name=f"downsample_{i}")(_masked(h, m))
            masks.append(m[:, ::2])
        masks.pop()
        mid = nn.scan(UNetStage, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.mid_blocks)(cfg, ch[-1], name="mid")
        h, _ = mid(h, masks[-1], temb)
        up = ch[::-1] + (ch[0],)
        for i in range(len(ch)):
            m, skip = masks.pop(), skips.pop()
            h = jnp.concatenate([h[:, :skip.shape[1]], skip], axis=-1)
            h, _ = UNetStage(cfg, up[i + 1], name=f"up_{i}")(h, m, temb)
            if i == len(ch) - 1:
                upsample = nn.Conv(up[i + 1], (3,), padding=[(1, 1)], name=f"upsample_{i}")
            else:  # torch ConvTranspose1d(k4, s2, p1)
                upsample = nn.ConvTranspose(up[i + 1], (4,), strides=(2,), padding=[(2, 2)], transpose_kernel=True,
                                            name=f"upsample_{i}")
            h = upsample(_masked(h, m))
        h = Block1D(up[-1], name="final_block")(h, m)
        return _masked(nn.Conv(cfg.output_size, (1,), name="final_proj")(_masked(h, m)), m)


# --------------------------------------------------------------------------------------------------- flow

class Flow(nn.Module):
    """The flow decoder's parameters and pieces. `__call__` is one conditional velocity evaluation end to end."""

    config: FlowConfig

    def setup(self):
        cfg = self.config
        self.input_embedding = nn.Embed(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Dense(cfg.output_size)
        self.encoder = FlowEncoder(cfg)
        self.encoder_proj = nn.Dense(cfg.output_size)
        self.length_regulator = LengthRegulator(cfg)
        self.estimator = Estimator(cfg)

    def encode(self, codes, token_mask):
        """codes [B, N] int; token_mask [B, N] bool -> h [B, N, C]."""
        x = self.input_embedding(codes) * token_mask[..., None]
        return self.encoder_proj(self.encoder(x, token_mask))

    def regulate(self, h, token_lengths, frame_mask):
        """h [B, N, C] -> mu [B, T, C] (T = frame_mask.shape[1]; row b has frame_mask[b].sum() frames)."""
        return self.length_regulator(h, token_lengths, frame_mask)

    def speaker(self, batch: int):
        """The projected speaker vector [B, C] for the all-zero x-vector (L2-normalising zeros gives zeros)."""
        return self.spk_embed_affine_layer(jnp.zeros((batch, self.config.spk_embed_dim), jnp.float32))

    def estimate(self, x, mask, mu, t, spk, cond):
        """The estimator's velocity [B, T, C] (see `Estimator`)."""
        return self.estimator(x, mask, mu, t, spk, cond)

    def __call__(self, codes, token_lengths, frame_mask, x, t):
        token_mask = jnp.arange(codes.shape[1])[None] < token_lengths[:, None]
        mu = self.regulate(self.encode(codes, token_mask), token_lengths, frame_mask)
        return self.estimate(x, frame_mask, mu, t, self.speaker(codes.shape[0]), jnp.zeros_like(mu))


def euler_schedule(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(t, dt) [n_steps] float32 of the reference loop: t_span = 1 - cos(linspace(0, 1, n+1) pi/2); t starts at 0,
    dt = t_span[1] - t_span[0], then t += dt and dt = t_span[k+1] - t (accumulated in float32)."""
    grid = np.linspace(0, 1, n_steps + 1, dtype=np.float32)
    t_span = np.float32(1) - np.cos(grid * np.float32(0.5) * np.float32(np.pi))
    ts, dts = [], []
    t, dt = t_span[0], t_span[1] - t_span[0]
    for step in range(1, n_steps + 1):
        ts.append(t)
        dts.append(dt)
        t = t + dt
        if step < n_steps:
            dt = t_span[step + 1] - t
    return np.array(ts, np.float32), np.array(dts, np.float32)


def generate_mel(flow: Flow, params, codes, token_lengths, frame_mask, noise):
    """Codes to mel by the CFG Euler solver, starting from `noise`.

    codes [B, N] int32 (padded); token_lengths [B]; frame_mask [B, T] bool with mel_frames(token_lengths) leading
    True; noise [B, T, C] (the reference draws it with torch.manual_seed(42)). Returns mel [B, T, C], zero on
    padded frames.
    """
    cfg = flow.config
    variables = {"params": params}
    b = codes.shape[0]
    token_mask = jnp.arange(codes.shape[1])[None] < token_lengths[:, None]
    h = flow.apply(variables, codes, token_mask, method=Flow.encode)
    mu = flow.apply(variables, h, token_lengths, frame_mask, method=Flow.regulate)
    spk = flow.apply(variables, b, method=Flow.speaker)
    # Conditional and unconditional passes as one batch of 2B; the unconditional one zeroes mu, spk and cond.
    mask2 = jnp.concatenate([frame_mask, frame_mask])
    mu2 = jnp.concatenate([mu, jnp.zeros_like(mu)])
    spk2 = jnp.concatenate([spk, jnp.zeros_like(spk)])
    cond2 = jnp.zeros_like(mu2)  # no prompt mel

    def step(x, t_dt):
        t, dt = t_dt
        v = flow.apply(variables, jnp.concatenate([x, x]), mask2, mu2, jnp.full((2 * b,), t), spk2, cond2,
                       method=Flow.estimate)
        v = (1.0 + cfg.cfg_rate) * v[:b] - cfg.cfg_rate * v[b:]
        return x + dt * v, None

    mel, _ = jax.lax.scan(step, noise, euler_schedule(cfg.n_timesteps))
    return jnp.where(frame_mask[..., None], mel, 0.0)
