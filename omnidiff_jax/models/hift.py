"""HiFT vocoder (CosyVoice `HiFTGenerator`: neural source filter + iSTFTNet): mel at 22050/256 Hz -> waveform.

Follows GLM-4-Voice `cosyvoice/hifigan/generator.py`:

    f0  = |classifier(ELU(conv3)^5 (mel))|                          Hz per frame
    s   = tanh(l_linear(e)), e_h = 0.1 sin(2 pi cumsum(h f0 / sr) + phi_h) uv + noise_h    h = 1..9, per sample
    x   = conv_pre(mel)
    per stage i: x = ups_i(leaky(x, 0.1)) (+ reflect-pad 1 on the last), x += source_resblock_i(source_down_i(
                 STFT(s))), x = mean_j resblock_ij(x)
    x   = conv_post(leaky(x, 0.01));  wave = iSTFT(exp(x[:9]) clipped at 100, sin(x[9:])), clamped to +-0.99

STFT/iSTFT are torch's (n_fft 16, hop 4, periodic Hann, center with reflect padding). The sine phase is
accumulated frame by frame modulo 1 (f0 is constant over each 256-sample frame), which is exact up to float32
rounding; the reference's float32 cumsum over all samples loses ~1e-3 cycles late in long utterances.

Randomness (the initial phases phi and the noise) is an input, so callers choose its source (a JAX key, or the
reference's torch draws in tests); `decode` also accepts the source signal s directly. Rows of a batch may be
padded: every convolution sees zeros past its row's length at its resolution, the STFT reflects at each row's own
end and the iSTFT counts only each row's frames, so a padded row equals the unpadded batch-1 reference.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HiFTConfig:
    """Shape of the vocoder; the defaults are the released `THUDM/glm-4-voice-decoder` (config.yaml `hift`)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8  # overtones above f0: 9 sines in all
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std where voiced
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 2
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_channels: int = 512  # f0 predictor width

    def __post_init__(self):
        n = len(self.upsample_rates)
        if not (len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes)
                == len(self.source_resblock_dilation_sizes) == n):
            raise ValueError("upsample_rates, upsample_kernel_sizes and the source_resblock lists must have one "
                             f"entry per upsampling stage ({n})")
        if self.n_fft % self.hop_len:
            raise ValueError(f"n_fft {self.n_fft} must be a multiple of hop_len {self.hop_len}")
        if self.base_channels % 2 ** n:
            raise ValueError(f"base_channels {self.base_channels} cannot be halved {n} times")

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (256)."""
        return int(np.prod(self.upsample_rates)) * self.hop_len

    @property
    def harmonics(self) -> int:
        return self.nb_harmonics + 1


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann (scipy get_window('hann', n, fftbins=True)), computed in float64, stored float32."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _lengths_mask(lengths, size: int):
    """[B, size, 1] bool: position < length."""
    return (jnp.arange(size)[None] < lengths[:, None])[..., None]


def _masked(x, mask):
    return jnp.where(mask, x, 0.0)


def stft(s, lengths, n_fft: int, hop: int) -> jax.Array:
    """torch.stft(center=True, pad_mode='reflect', periodic Hann window of n_fft) of each row's first `lengths`
    samples. s [B, L] -> complex [B, L // hop + 1, n_fft // 2 + 1]; frames past a row's end are junk."""
    b, size = s.shape
    n = jnp.abs(jnp.arange(size + n_fft) - n_fft // 2)[None]  # reflect at the start
    end = lengths[:, None]
    n = jnp.clip(jnp.where(n >= end, 2 * (end - 1) - n, n), 0, size - 1)  # reflect at each row's end
    padded = jnp.take_along_axis(s, jnp.broadcast_to(n, (b, size + n_fft)), axis=1)
    starts = jnp.arange(size // hop + 1) * hop
    frames = padded[:, starts[:, None] + jnp.arange(n_fft)[None]]  # [B, F, n_fft]
    return jnp.fft.rfft(frames * hann_window(n_fft), axis=-1)


def _overlap_add(frames, hop: int) -> jax.Array:
    """[B, F, n_fft] -> [B, hop (F - 1) + n_fft] (n_fft a multiple of hop)."""
    b, f, n_fft = frames.shape
    r = n_fft // hop
    chunks = frames.reshape(b, f, r, hop)
    out = jnp.zeros((b, f + r - 1, hop), frames.dtype)
    for j in range(r):
        out = out.at[:, j:j + f].add(chunks[:, :, j])
    return out.reshape(b, -1)


def istft(spec, frame_mask, n_fft: int, hop: int) -> jax.Array:
    """torch.istft(center=True, same window) with only the frames where frame_mask [B, F] is True:
    irfft x window, overlap-add, divide by the overlap-added window^2, trim n_fft/2 each end -> [B, hop (F - 1)]."""
    window = hann_window(n_fft)
    frames = jnp.where(frame_mask[..., None], jnp.fft.irfft(spec, n=n_fft, axis=-1) * window, 0.0)
    envelope = _overlap_add(jnp.where(frame_mask[..., None], window * window, 0.0), hop)
    out = _overlap_add(frames, hop)
    out = jnp.where(envelope > 1e-11, out / jnp.where(envelope > 1e-11, envelope, 1.0), 0.0)
    return out[:, n_fft // 2:n_fft // 2 + hop * (spec.shape[1] - 1)]


class Snake(nn.Module):
    """x + sin^2(alpha x) / (alpha + 1e-9), alpha per channel (stored linearly)."""

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],))
        return x + (1.0 / (alpha + 1e-9)) * jnp.sin(x * alpha) ** 2


class ResBlock(nn.Module):
    """For each dilation d: x += conv2(Snake(conv1_d(Snake(x)))), "same" padding."""

    kernel_size: int
    dilations: tuple[int, ...]

    @nn.compact
    def __call__(self, x, m):
        c, k = x.shape[-1], self.kernel_size
        for n, d in enumerate(self.dilations):
            xt = Snake(name=f"activations1_{n}")(x)
            xt = nn.Conv(c, (k,), kernel_dilation=(d,), padding=[(d * (k - 1) // 2,) * 2], name=f"convs1_{n}")(
                _masked(xt, m))
            xt = Snake(name=f"activations2_{n}")(xt)
            xt = nn.Conv(c, (k,), padding=[((k - 1) // 2,) * 2], name=f"convs2_{n}")(_masked(xt, m))
            x = x + xt
        return x


class F0Predictor(nn.Module):
    """Five conv3 + ELU layers, a per-frame linear, abs: mel [B, T, C] -> f0 [B, T] in Hz."""

    channels: int

    @nn.compact
    def __call__(self, mel, m):
        x = mel
        for n in range(5):
            x = nn.elu(nn.Conv(self.channels, (3,), padding=[(1, 1)], name=f"condnet_{n}")(_masked(x, m)))
        return jnp.abs(nn.Dense(1, name="classifier")(x)[..., 0])


class HiFT(nn.Module):
    """The vocoder. `__call__(mel, frame_lengths, phases, noise)` runs f0 -> source -> `decode`."""

    config: HiFTConfig

    def setup(self):
        cfg = self.config
        base = cfg.base_channels
        self.f0_predictor = F0Predictor(cfg.f0_channels)
        self.l_linear = nn.Dense(1)
        self.conv_pre = nn.Conv(base, (7,), padding=[(3, 3)])
        self.ups = [nn.ConvTranspose(base // 2 ** (i + 1), (k,), strides=(u,), transpose_kernel=True,
                                     padding=[(k - 1 - (k - u) // 2,) * 2])  # torch ConvTranspose1d(k, u, (k-u)/2)
                    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))]
        # The source spectrogram is brought to each stage's rate: stride = product of the later upsample rates.
        strides = [int(np.prod(cfg.upsample_rates[i + 1:])) for i in range(len(cfg.upsample_rates))]
        self.source_downs = [nn.Conv(base // 2 ** (i + 1), (1,)) if u == 1 else
                             nn.Conv(base // 2 ** (i + 1), (2 * u,), strides=(u,), padding=[(u // 2, u // 2)])
                             for i, u in enumerate(strides)]
        self.source_resblocks = [ResBlock(k, tuple(d)) for k, d in zip(cfg.source_resblock_kernel_sizes,
                                                                      cfg.source_resblock_dilation_sizes)]
        self.resblocks = [ResBlock(k, tuple(d)) for _ in cfg.upsample_rates
                          for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)]
        self.conv_post = nn.Conv(cfg.n_fft + 2, (7,), padding=[(3, 3)])

    def f0(self, mel, frame_lengths):
        """mel [B, T, C] -> f0 [B, T] Hz."""
        return self.f0_predictor(mel, _lengths_mask(frame_lengths, mel.shape[1]))

    def source(self, f0, phases, noise):
        """The harmonic source s [B, T * 256] from f0 [B, T], initial phases [B, H] (row 0 ignored: h = 1 starts at
        phase 0) and standard normal noise [B, T, 256, H]."""
        cfg = self.config
        hop = cfg.samples_per_frame
        harmonics = jnp.arange(1, cfg.harmonics + 1, dtype=jnp.float32)
        rate = f0[..., None] * harmonics / cfg.sampling_rate  # [B, T, H] cycles per sample
        per_frame = rate * hop
        per_frame = per_frame - jnp.floor(per_frame)
        done = jax.lax.associative_scan(lambda a, b: (a + b) % 1.0, per_frame, axis=1)
        start = jnp.concatenate([jnp.zeros_like(done[:, :1]), done[:, :-1]], axis=1)  # phase before each frame
        steps = jnp.arange(1, hop + 1, dtype=jnp.float32)[:, None]
        phase = (start[:, :, None] + steps * rate[:, :, None]) % 1.0  # [B, T, 256, H]
        phi = jnp.asarray(phases).at[:, 0].set(0.0)[:, None, None, :]
        sine = cfg.nsf_alpha * jnp.sin(2 * np.pi * phase + phi)
        uv = (f0 > cfg.nsf_voiced_threshold).astype(jnp.float32)[:, :, None, None]
        excitation = sine * uv + (uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3) * noise
        s = jnp.tanh(self.l_linear(excitation))[..., 0]  # [B, T, 256]
        return s.reshape(s.shape[0], -1)

    def decode(self, mel, s, frame_lengths):
        """mel [B, T, C], source s [B, 256 T] -> waveform [B, 256 T] (each row valid for 256 frame_lengths)."""
        cfg = self.config
        hop, n_fft = cfg.hop_len, cfg.n_fft
        spec = stft(s, frame_lengths * cfg.samples_per_frame, n_fft, hop)
        spec = jnp.concatenate([spec.real, spec.imag], axis=-1)  # [B, 64T + 1, 18]
        spec_len = frame_lengths * (cfg.samples_per_frame // hop) + 1
        spec = _masked(spec, _lengths_mask(spec_len, spec.shape[1]))
        lengths = frame_lengths
        x = self.conv_pre(_masked(mel, _lengths_mask(lengths, mel.shape[1])))
        k = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(_masked(nn.leaky_relu(x, cfg.lrelu_slope), _lengths_mask(lengths, x.shape[1])))
            lengths = lengths * cfg.upsample_rates[i]
            if i == len(self.ups) - 1:  # ReflectionPad1d((1, 0))
                x = jnp.concatenate([x[:, 1:2], x], axis=1)
                lengths = lengths + 1
            m = _lengths_mask(lengths, x.shape[1])
            x = x + self.source_resblocks[i](self.source_downs[i](spec), m)
            x = sum(self.resblocks[i * k + j](x, m) for j in range(k)) / k
        x = self.conv_post(_masked(nn.leaky_relu(x, 0.01), m))
        magnitude = jnp.minimum(jnp.exp(x[..., :n_fft // 2 + 1]), 100.0)
        phase = jnp.sin(x[..., n_fft // 2 + 1:])
        wave = istft(jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)), m[..., 0], n_fft, hop)
        return jnp.clip(wave, -cfg.audio_limit, cfg.audio_limit)

    def __call__(self, mel, frame_lengths, phases, noise):
        return self.decode(mel, self.source(self.f0(mel, frame_lengths), phases, noise), frame_lengths)

