"""A PyTorch GLM-4-Voice speech decoder (flow matching + HiFT) with the reference's state_dict names, for parity.

Written from GLM-4-Voice `flow_inference.py`, `cosyvoice/flow/` and `cosyvoice/hifigan/`, independently of our JAX code:
the block relative-position encoder with the pad-and-reshape `rel_shift`, `F.interpolate` nearest, the Matcha U-Net with
the diffusers attention and its additive-mask quirk, the seeded Euler/CFG solver, and HiFT with torch's own STFT/iSTFT
and RNG-driven sine source. Weight norm uses torch's parametrization; `save_checkpoint` writes either key style
(`weight_g`/`weight_v`, as in the released `hift.pt`, or `parametrizations.weight.original0/1`).

Configs are plain dicts in the `config.yaml` schema (`FLOW`/`HIFT` hold the released values); `config_yaml`
renders them as a hyperpyyaml file like the released one.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

FLOW = {
    "input_size": 512, "output_size": 80, "spk_embed_dim": 192, "vocab_size": 16384, "input_frame_rate": 12.5,
    "encoder": {"output_size": 512, "attention_heads": 8, "linear_units": 2048, "num_blocks": 6, "block_size": 10},
    "length_regulator": {"channels": 80, "sampling_ratios": [1, 1, 1, 1]},
    "cfm": {"inference_cfg_rate": 0.7},
    "estimator": {"in_channels": 320, "out_channels": 80, "channels": [256, 256], "attention_head_dim": 64,
                  "n_blocks": 4, "num_mid_blocks": 12, "num_heads": 8},
}
HIFT = {
    "in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 22050, "nsf_alpha": 0.1,
    "nsf_sigma": 0.003, "nsf_voiced_threshold": 10, "upsample_rates": [8, 8], "upsample_kernel_sizes": [16, 16],
    "n_fft": 16, "hop_len": 4, "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
    "source_resblock_kernel_sizes": [7, 11], "source_resblock_dilation_sizes": [[1, 3, 5]] * 2,
    "lrelu_slope": 0.1, "audio_limit": 0.99, "cond_channels": 512,
}
# Small but complete: every code path of the real decoder (two U-Net stages, scanned mid blocks, 10-token
# encoder blocks, both HiFT stages, 9 harmonics) at a few percent of the cost.
TINY_FLOW = {
    "input_size": 32, "output_size": 16, "spk_embed_dim": 8, "vocab_size": 16384, "input_frame_rate": 12.5,
    "encoder": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 2, "block_size": 10},
    "length_regulator": {"channels": 16, "sampling_ratios": [1, 1]},
    "cfm": {"inference_cfg_rate": 0.7},
    "estimator": {"in_channels": 64, "out_channels": 16, "channels": [32, 32], "attention_head_dim": 8,
                  "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 2},
}
TINY_HIFT = {**HIFT, "in_channels": 16, "base_channels": 16, "cond_channels": 16,
             "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3]] * 2,
             "source_resblock_kernel_sizes": [5, 7], "source_resblock_dilation_sizes": [[1, 3]] * 2}


# ------------------------------------------------------------------------------------------------ flow encoder

def rel_positions(T, d):
    """[2T-1, d]: row m encodes relative position T-1-m; even features sin, odd cos."""
    r = torch.arange(T - 1, -T, -1, dtype=torch.float32)[:, None]
    omega = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(2 * T - 1, d)
    pe[:, 0::2] = torch.sin(r * omega)
    pe[:, 1::2] = torch.cos(r * omega)
    return pe


def rel_shift(x):
    """[B, H, T, 2T-1] -> [B, H, T, T] by the Transformer-XL pad-and-reshape trick."""
    B, H, T, M = x.shape
    padded = torch.cat([x.new_zeros(B, H, T, 1), x], dim=-1).view(B, H, M + 1, T)
    return padded[:, :, 1:].reshape(B, H, T, M)[..., :T]


class BlockRelPosAttention(nn.Module):
    def __init__(self, d, heads, block_size):
        super().__init__()
        self.h, self.dk, self.block = heads, d // heads, block_size
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = (nn.Linear(d, d) for _ in range(4))
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.dk))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.dk))

    def forward(self, x, pad_mask, pos_emb):
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.dk)
        k = self.linear_k(x).view(B, T, self.h, self.dk).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.dk).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(-1, self.h, self.dk).transpose(0, 1)  # [H, 2T-1, dk]
        ac = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
        bd = rel_shift((q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
        scores = (ac + bd) / math.sqrt(self.dk)
        i = torch.arange(T)
        grid = (i[None, :] <= i[:, None]) | (i[None, :] // self.block == i[:, None] // self.block)
        allowed = (pad_mask[:, None, :] & grid[None])[:, None]  # [B, 1, T, T]
        attn = torch.softmax(scores.masked_fill(~allowed, -float("inf")), dim=-1).masked_fill(~allowed, 0.0)
        return self.linear_out((attn @ v).transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, d, units):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d, units), nn.Linear(units, d)

    def forward(self, x):
        return self.w_2(F.silu(self.w_1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, units, block_size):
        super().__init__()
        self.self_attn = BlockRelPosAttention(d, heads, block_size)
        self.feed_forward = FeedForward(d, units)
        self.norm_ff, self.norm_mha = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)

    def forward(self, x, pad_mask, pos_emb):
        x = x + self.self_attn(self.norm_mha(x), pad_mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class Embed(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d, eps=1e-5), nn.Dropout(0.1))


class FlowEncoder(nn.Module):
    def __init__(self, d_in, c):
        super().__init__()
        d = c["output_size"]
        self.embed = Embed(d_in, d)
        self.encoders = nn.ModuleList(EncoderLayer(d, c["attention_heads"], c["linear_units"], c["block_size"])
                                      for _ in range(c["num_blocks"]))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xs, lengths):
        T, d = xs.shape[1], self.after_norm.normalized_shape[0]
        pad_mask = torch.arange(T)[None] < lengths[:, None]
        x = self.embed.out(xs) * math.sqrt(d)
        pos_emb = rel_positions(T, d)
        for layer in self.encoders:
            x = layer(x, pad_mask, pos_emb)
        return self.after_norm(x)


class LengthRegulator(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch = c["channels"]
        layers = []
        for _ in c["sampling_ratios"]:
            layers += [nn.Conv1d(ch, ch, 3, 1, 1), nn.GroupNorm(1, ch), nn.Mish()]
        self.model = nn.Sequential(*layers, nn.Conv1d(ch, ch, 1, 1))

    def forward(self, h, frames):  # h [B, N, C]; batch 1
        x = F.interpolate(h.transpose(1, 2), size=frames, mode="nearest")
        return self.model(x).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ estimator

class Block1D(nn.Module):
    def __init__(self, d, d_out):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(d, d_out, 3, padding=1), nn.GroupNorm(8, d_out), nn.Mish())

    def forward(self, x, mask):
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, d, d_out, temb_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(temb_dim, d_out))
        self.block1, self.block2 = Block1D(d, d_out), Block1D(d_out, d_out)
        self.res_conv = nn.Conv1d(d, d_out, 1)

    def forward(self, x, mask, temb):
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class Attention(nn.Module):
    """The diffusers self-attention as the estimator uses it: the 0/1 mask is *added* to the scores."""

    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.h = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, heads * head_dim, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, d), nn.Dropout(0.0)])

    def forward(self, x, additive_mask):
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, self.h, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask[:, None])
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, -1))


class GELUProj(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.proj = nn.Linear(d, inner)

    def forward(self, x):
        return F.gelu(self.proj(x))


class FeedForwardGELU(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(d, 4 * d), nn.Dropout(0.0), nn.Linear(4 * d, d)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.attn1 = Attention(d, heads, head_dim)
        self.norm3 = nn.LayerNorm(d, eps=1e-5)
        self.ff = FeedForwardGELU(d)

    def forward(self, x, additive_mask):
        x = x + self.attn1(self.norm1(x), additive_mask)
        return x + self.ff(self.norm3(x))


class ConvUnderName(nn.Module):
    """A conv kept as `.conv`, as Matcha's Downsample1D (k3 s2 p1) and Upsample1D (transposed k4 s2 p1) keep theirs."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class TimestepMLP(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d), nn.Linear(d, d)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def time_embedding(t, dim):
    t = t.reshape(-1)
    half = dim // 2
    freqs = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    a = 1000 * t[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=-1)


class Estimator(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.in_channels = c["in_channels"]
        ch = tuple(c["channels"])
        temb = ch[0] * 4
        tb = lambda d: nn.ModuleList(TransformerBlock(d, c["num_heads"], c["attention_head_dim"])  # noqa: E731
                                     for _ in range(c["n_blocks"]))
        self.time_mlp = TimestepMLP(c["in_channels"], temb)
        self.down_blocks, self.mid_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        out = c["in_channels"]
        for i, d in enumerate(ch):
            last = i == len(ch) - 1
            self.down_blocks.append(nn.ModuleList([
                ResnetBlock1D(out, d, temb), tb(d),
                nn.Conv1d(d, d, 3, padding=1) if last else ConvUnderName(nn.Conv1d(d, d, 3, 2, 1))]))
            out = d
        for _ in range(c["num_mid_blocks"]):
            self.mid_blocks.append(nn.ModuleList([ResnetBlock1D(ch[-1], ch[-1], temb), tb(ch[-1])]))
        up = ch[::-1] + (ch[0],)
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            self.up_blocks.append(nn.ModuleList([
                ResnetBlock1D(2 * up[i], up[i + 1], temb), tb(up[i + 1]),
                nn.Conv1d(up[i + 1], up[i + 1], 3, padding=1) if last else
                ConvUnderName(nn.ConvTranspose1d(up[i + 1], up[i + 1], 4, 2, 1))]))
        self.final_block = Block1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], c["out_channels"], 1)

    @staticmethod
    def _stage(x, mask, temb, resnet, blocks):
        x = resnet(x, mask, temb).transpose(1, 2)
        additive = mask.transpose(1, 2) @ mask  # [B, T, T] of 0/1, added to the scores (the reference quirk)
        for block in blocks:
            x = block(x, additive)
        return x.transpose(1, 2)

    def forward(self, x, mask, mu, t, spks, cond):  # channel-first [B, C, T]; mask [B, 1, T]
        temb = self.time_mlp(time_embedding(t, self.in_channels))
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        skips, masks = [], [mask]
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = self._stage(x, m, temb, resnet, blocks)
            skips.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        for resnet, blocks in self.mid_blocks:
            x = self._stage(x, masks[-1], temb, resnet, blocks)
        for resnet, blocks, up in self.up_blocks:
            m, skip = masks.pop(), skips.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
            x = up(self._stage(x, m, temb, resnet, blocks) * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask


class CFM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.estimator = Estimator(c["estimator"])
        self.cfg_rate = c["cfm"]["inference_cfg_rate"]

    def forward(self, mu, mask, n_timesteps, spks, cond):
        torch.manual_seed(42)
        x = torch.randn_like(mu)
        t_span = 1 - torch.cos(torch.linspace(0, 1, n_timesteps + 1) * 0.5 * torch.pi)
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v = self.estimator(x, mask, mu, t, spks, cond)
            v_u = self.estimator(x, mask, torch.zeros_like(mu), t, torch.zeros_like(spks), torch.zeros_like(cond))
            v = (1.0 + self.cfg_rate) * v - self.cfg_rate * v_u
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


def mel_frames(n_tokens, frame_rate=12.5):
    """The reference's frame count: int tensor / 12.5 * 22050 / 256 in float32, truncated."""
    return (torch.tensor([n_tokens], dtype=torch.int32) / frame_rate * 22050 / 256).int()


class Flow(nn.Module):
    """MaskedDiffWithXvec at inference: empty prompt, zero speaker vector, batch 1."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.input_embedding = nn.Embedding(c["vocab_size"], c["input_size"])
        self.spk_embed_affine_layer = nn.Linear(c["spk_embed_dim"], c["output_size"])
        self.encoder = FlowEncoder(c["input_size"], c["encoder"])
        self.encoder_proj = nn.Linear(c["encoder"]["output_size"], c["output_size"])
        self.length_regulator = LengthRegulator(c["length_regulator"])
        self.decoder = CFM(c)

    def encode(self, token):
        n = torch.tensor([token.shape[1]])
        return self.encoder_proj(self.encoder(self.input_embedding(token.clamp(min=0)), n))

    def speaker(self):
        return self.spk_embed_affine_layer(F.normalize(torch.zeros(1, self.c["spk_embed_dim"]), dim=1))

    @torch.inference_mode()
    def inference(self, token, n_timesteps=10):
        """token [1, N] -> mel [1, 80, T]."""
        h = self.encode(token)
        T = int(mel_frames(token.shape[1], self.c["input_frame_rate"])[0])
        mu = self.length_regulator(h, T)
        mask = torch.ones(1, 1, T)
        cond = torch.zeros(1, self.c["output_size"], T)
        return self.decoder(mu.transpose(1, 2), mask, n_timesteps, self.speaker(), cond)


# ------------------------------------------------------------------------------------------------ HiFT

class Snake(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(ch))

    def forward(self, x):
        a = self.alpha[None, :, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class ResBlock(nn.Module):
    def __init__(self, ch, k, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(nn.Conv1d(ch, ch, k, 1, dilation=d, padding=(k * d - d) // 2))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(nn.Conv1d(ch, ch, k, 1, dilation=1, padding=(k - 1) // 2))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(ch) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(ch) for _ in dilations)

    def forward(self, x):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    def __init__(self, ch_in, ch):
        super().__init__()
        layers = []
        for n in range(5):
            layers += [weight_norm(nn.Conv1d(ch_in if n == 0 else ch, ch, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, 1)

    def forward(self, mel):  # [B, C, T] -> [B, T]
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SineGen(nn.Module):
    def __init__(self, sr, harmonics, amp, noise_std, threshold):
        super().__init__()
        self.sr, self.h, self.amp, self.noise_std, self.threshold = sr, harmonics, amp, noise_std, threshold

    @torch.no_grad()
    def forward(self, f0):  # [B, 1, L] Hz
        rates = torch.cat([f0 * (i + 1) / self.sr for i in range(self.h + 1)], dim=1)  # [B, H, L]
        theta = 2 * np.pi * (torch.cumsum(rates, dim=-1) % 1)
        phase = torch.distributions.Uniform(-np.pi, np.pi).sample((f0.shape[0], self.h + 1, 1))
        phase[:, 0] = 0
        sines = self.amp * torch.sin(theta + phase)
        uv = (f0 > self.threshold).float()
        noise = (uv * self.noise_std + (1 - uv) * self.amp / 3) * torch.randn_like(sines)
        return sines * uv + noise


class SourceModule(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.l_sin_gen = SineGen(c["sampling_rate"], c["nb_harmonics"], c["nsf_alpha"], c["nsf_sigma"],
                                 c["nsf_voiced_threshold"])
        self.l_linear = nn.Linear(c["nb_harmonics"] + 1, 1)

    def forward(self, f0_up):  # [B, 1, L] -> [B, 1, L]
        return torch.tanh(self.l_linear(self.l_sin_gen(f0_up).transpose(1, 2))).transpose(1, 2)


class HiFT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        base, rates, n_fft = c["base_channels"], c["upsample_rates"], c["n_fft"]
        self.m_source = SourceModule(c)
        self.f0_predictor = F0Predictor(c["in_channels"], c["cond_channels"])
        self.conv_pre = weight_norm(nn.Conv1d(c["in_channels"], base, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, c["upsample_kernel_sizes"])))
        down_rates = np.cumprod([1] + rates[::-1][:-1])[::-1]
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down_rates, c["source_resblock_kernel_sizes"],
                                          c["source_resblock_dilation_sizes"])):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1) if u == 1 else
                                     nn.Conv1d(n_fft + 2, ch, int(2 * u), int(u), padding=int(u // 2)))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d) for i in range(len(rates))
            for k, d in zip(c["resblock_kernel_sizes"], c["resblock_dilation_sizes"]))
        self.conv_post = weight_norm(nn.Conv1d(base // 2 ** len(rates), n_fft + 2, 7, 1, padding=3))
        n = np.arange(n_fft)
        self.window = torch.from_numpy((0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)).astype(np.float32))

    def source(self, mel):
        """mel [B, C, T] -> s [B, 1, 256T] (draws the sine phases and noise from torch's RNG)."""
        f0 = self.f0_predictor(mel)
        scale = int(np.prod(self.c["upsample_rates"])) * self.c["hop_len"]
        return self.m_source(F.interpolate(f0[:, None], scale_factor=scale, mode="nearest"))

    @torch.inference_mode()
    def decode(self, mel, s):
        """mel [B, C, T], source s [B, 1, 256T] -> waveform [B, 256T]."""
        c, n_fft, hop = self.c, self.c["n_fft"], self.c["hop_len"]
        spec = torch.stft(s[:, 0], n_fft, hop, n_fft, window=self.window, return_complex=True)
        s_stft = torch.cat([spec.real, spec.imag], dim=1)
        x = self.conv_pre(mel)
        k = len(c["resblock_kernel_sizes"])
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c["lrelu_slope"]))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(F.leaky_relu(x))
        mag = torch.exp(x[:, :n_fft // 2 + 1]).clip(max=1e2)
        phase = torch.sin(x[:, n_fft // 2 + 1:])
        wave = torch.istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)), n_fft, hop, n_fft,
                           window=self.window)
        return wave.clamp(-c["audio_limit"], c["audio_limit"])

    @torch.inference_mode()
    def forward(self, mel):
        s = self.source(mel)
        return self.decode(mel, s), s


# ------------------------------------------------------------------------------------------------ weights, files

@torch.no_grad()
def randomize_(module, seed):
    """Random weights that keep activations O(1): scaled Gaussians, non-trivial norms and biases, positive Snake
    alphas and weight-norm magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("alpha"):
            p.copy_(1.0 + 0.2 * noise.abs())
        elif name.endswith("original0"):  # weight-norm magnitude g; a quiet conv_post keeps the wave unclipped
            p.copy_((0.5 + noise.abs()) * (0.05 if name.startswith("conv_post") else 1.0))
        elif name.endswith(("pos_bias_u", "pos_bias_v")):
            p.copy_(0.5 * noise)
        elif p.ndim == 1:  # every 1-D weight here is a LayerNorm/GroupNorm scale
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        elif name.endswith("embedding.weight"):
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def random_flow(c=TINY_FLOW, seed=0):
    return randomize_(Flow(c).eval(), seed)


def random_hift(c=TINY_HIFT, seed=1):
    return randomize_(HiFT(c).eval(), seed)


def state_dict(module, weight_norm_keys="weight_g"):
    """The module's state dict, weight norm keyed as the released file (`weight_g`/`weight_v`) or by the
    parametrization API (`parametrizations`)."""
    out = {}
    for k, v in module.state_dict().items():
        if weight_norm_keys == "weight_g":
            k = k.replace("parametrizations.weight.original0", "weight_g")
            k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v.detach().clone().contiguous()
    return out


def config_yaml(flow=TINY_FLOW, hift=TINY_HIFT):
    """A hyperpyyaml config like the released decoder's `config.yaml` (tags, `!ref`, an unused llm section)."""
    e, lr, est = flow["encoder"], flow["length_regulator"], flow["estimator"]
    h = hift
    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

sample_rate: {h['sampling_rate']}
spk_embed_dim: {flow['spk_embed_dim']}

llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: 512
    spk_embed_dim: !ref <spk_embed_dim>

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow['input_size']}
    output_size: {flow['output_size']}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {flow['vocab_size']}
    input_frame_rate: {flow['input_frame_rate']}
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {e['output_size']}
        attention_heads: {e['attention_heads']}
        linear_units: {e['linear_units']}
        num_blocks: {e['num_blocks']}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: {e['block_size']}
        input_size: {flow['input_size']}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: {lr['channels']}
        sampling_ratios: {lr['sampling_ratios']}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: {3 * flow['output_size']}
        n_spks: 1
        spk_emb_dim: {flow['output_size']}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: {flow['cfm']['inference_cfg_rate']}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {est['in_channels']}
            out_channels: {est['out_channels']}
            channels: {est['channels']}
            dropout: 0
            attention_head_dim: {est['attention_head_dim']}
            n_blocks: {est['n_blocks']}
            num_mid_blocks: {est['num_mid_blocks']}
            num_heads: {est['num_heads']}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {h['in_channels']}
    base_channels: {h['base_channels']}
    nb_harmonics: {h['nb_harmonics']}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h['nsf_alpha']}
    nsf_sigma: {h['nsf_sigma']}
    nsf_voiced_threshold: {h['nsf_voiced_threshold']}
    upsample_rates: {h['upsample_rates']}
    upsample_kernel_sizes: {h['upsample_kernel_sizes']}
    istft_params:
        n_fft: {h['n_fft']}
        hop_len: {h['hop_len']}
    resblock_kernel_sizes: {h['resblock_kernel_sizes']}
    resblock_dilation_sizes: {h['resblock_dilation_sizes']}
    source_resblock_kernel_sizes: {h['source_resblock_kernel_sizes']}
    source_resblock_dilation_sizes: {h['source_resblock_dilation_sizes']}
    lrelu_slope: {h['lrelu_slope']}
    audio_limit: {h['audio_limit']}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {h['in_channels']}
        cond_channels: {h['cond_channels']}
"""


def save_decoder(folder, flow, hift, flow_cfg=TINY_FLOW, hift_cfg=TINY_HIFT, weight_norm_keys="weight_g"):
    """Writes a `THUDM/glm-4-voice-decoder`-style folder: config.yaml, flow.pt, hift.pt (torch.save'd dicts)."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_yaml(flow_cfg, hift_cfg))
    torch.save(state_dict(flow), folder / "flow.pt")
    torch.save(state_dict(hift, weight_norm_keys), folder / "hift.pt")
    return folder
