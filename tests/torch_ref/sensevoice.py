"""A PyTorch speech-input path (Omni-Diffusion `modeling_sensevoice.py`, `resampler_projector.py`) with the
reference's state_dict names, for parity tests.

Written from a description of the reference, independently of our JAX/NumPy code:
- `kaldi_fbank`: Kaldi's fbank as torchaudio's `compliance.kaldi.fbank` computes it, for the options WavFrontend
  uses (float32 torch ops); `apply_lfr`, `load_cmvn` and `apply_cmvn` follow FunASR's loops line by line.
- `SenseVoiceSmall` (embed, encoder.{encoders0, encoders, after_norm, tp_encoders, tp_norm}, ctc.ctc_lo) with the
  `AudioEncoder.forward` path (`audio_encoder`), and `ResamplerProjector` (pre_proj_layernorm, mlp.0/1/2).
- `sinc_resample`: torchaudio's default `Resample` (sinc_interp_hann, width 6, rolloff 0.99), to measure how
  close soxr comes to the reference's resampler.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------- front end


def mel_scale(f):
    return 1127.0 * torch.log(1.0 + f / 700.0)


def kaldi_fbank(wave, dither=0.0, num_mel_bins=80, sample_rate=16000):
    """wave [N] float32 (int16 range) -> [T, 80]: frames, dither, DC removal, pre-emphasis, Hamming, |rfft|², mel, log."""
    size, shift, nfft = 400, 160, 512
    t = 1 + (wave.numel() - size) // shift
    frames = wave.as_strided((t, size), (shift, 1)).clone()
    if dither:
        frames = frames + dither * torch.randn_like(frames)
    frames = frames - frames.mean(dim=1, keepdim=True)
    shifted = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # the first sample replicated on the left
    frames = frames - 0.97 * shifted
    window = torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float32)
    frames = F.pad(frames * window, (0, nfft - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [T, 257]

    nyquist = sample_rate / 2
    low, high = mel_scale(torch.tensor(20.0)), mel_scale(torch.tensor(nyquist))
    delta = (high - low) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins, dtype=torch.float32)[:, None]
    left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    mel = mel_scale(sample_rate / nfft * torch.arange(nfft // 2, dtype=torch.float32))[None, :]
    banks = torch.clamp(torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)), min=0.0)
    banks = F.pad(banks, (0, 1))  # [80, 257]
    energies = power @ banks.T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()


def apply_lfr(inputs, lfr_m=7, lfr_n=6):
    """FunASR's LFR loop: left-pad with 3 copies of frame 0, take 7 frames every 6, pad the tail with the last."""
    t = inputs.shape[0]
    t_lfr = int(np.ceil(t / lfr_n))
    inputs = torch.vstack([inputs[0].repeat((lfr_m - 1) // 2, 1), inputs])
    t = t + (lfr_m - 1) // 2
    out = []
    for i in range(t_lfr):
        if lfr_m <= t - i * lfr_n:
            out.append(inputs[i * lfr_n:i * lfr_n + lfr_m].reshape(1, -1))
        else:
            frame = inputs[i * lfr_n:].reshape(-1)
            for _ in range(lfr_m - (t - i * lfr_n)):
                frame = torch.hstack([frame, inputs[-1]])
            out.append(frame.reshape(1, -1))
    return torch.vstack(out).float()


def load_cmvn(path):
    """[2, D]: means (<AddShift>) and vars (<Rescale>), items [3:-1] of the <LearnRateCoef> line after each tag."""
    lines = open(path, encoding="utf-8").readlines()
    means = variances = None
    for i, line in enumerate(lines):
        items = line.split()
        if items and items[0] in ("<AddShift>", "<Rescale>"):
            nxt = lines[i + 1].split()
            if nxt[0] == "<LearnRateCoef>":
                values = [float(v) for v in nxt[3:len(nxt) - 1]]
                if items[0] == "<AddShift>":
                    means = values
                else:
                    variances = values
    return torch.tensor([means, variances], dtype=torch.float32)


def apply_cmvn(inputs, cmvn):
    return ((inputs + cmvn[0:1, :inputs.shape[1]]) * cmvn[1:2, :inputs.shape[1]]).float()


def frontend(wave, cmvn, dither=0.0):
    """WavFrontend for one 16 kHz float wave [N] in [-1, 1] -> [T_lfr, 560]."""
    return apply_cmvn(apply_lfr(kaldi_fbank(wave * 32768, dither)), cmvn)


# --------------------------------------------------------------------------------------------------- encoder


def sinusoidal_encode(length, depth, dtype):
    """Positions 1..length; every op runs in `dtype` (the reference passes x.dtype)."""
    positions = torch.arange(1, length + 1)[None, :].type(dtype)
    inc = torch.log(torch.tensor([10000], dtype=dtype)) / (depth / 2 - 1)
    inv = torch.exp(torch.arange(depth / 2).type(dtype) * (-inc))
    scaled = torch.reshape(positions, [1, -1, 1]) * torch.reshape(inv, [1, 1, -1])
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=2).type(dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class MultiHeadedAttentionSANM(nn.Module):
    def __init__(self, n_head, in_feat, n_feat, kernel_size):
        super().__init__()
        self.d_k, self.h = n_feat // n_head, n_head
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_q_k_v = nn.Linear(in_feat, n_feat * 3)
        self.fsmn_block = nn.Conv1d(n_feat, n_feat, kernel_size, stride=1, padding=0, groups=n_feat, bias=False)
        left = (kernel_size - 1) // 2
        self.pad = nn.ConstantPad1d((left, kernel_size - 1 - left), 0.0)

    def forward(self, x, mask):  # mask [N, 1, T]
        b, t, _ = x.shape
        q, k, v = torch.split(self.linear_q_k_v(x), self.h * self.d_k, dim=-1)
        heads = lambda a: a.reshape(b, t, self.h, self.d_k).transpose(1, 2)  # noqa: E731
        m = mask.reshape(b, -1, 1)
        inputs = v * m
        fsmn = self.fsmn_block(self.pad(inputs.transpose(1, 2))).transpose(1, 2)
        fsmn = (fsmn + inputs) * m
        q_h = heads(q) * self.d_k ** (-0.5)
        scores = torch.matmul(q_h, heads(k).transpose(-2, -1))
        key_pad = mask.unsqueeze(1).eq(0)  # [N, 1, 1, T]
        attn = torch.softmax(scores.masked_fill(key_pad, -float("inf")), dim=-1).masked_fill(key_pad, 0.0)
        ctx = torch.matmul(attn, heads(v)).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(ctx) + fsmn


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim, units):
        super().__init__()
        self.w_1 = nn.Linear(idim, units)
        self.w_2 = nn.Linear(units, idim)

    def forward(self, x):
        return self.w_2(torch.relu(self.w_1(x)))


class EncoderLayerSANM(nn.Module):
    def __init__(self, in_size, size, c):
        super().__init__()
        self.self_attn = MultiHeadedAttentionSANM(c["attention_heads"], in_size, size, c["kernel_size"])
        self.feed_forward = PositionwiseFeedForward(size, c["linear_units"])
        self.norm1, self.norm2 = LayerNorm(in_size), LayerNorm(size)
        self.in_size, self.size = in_size, size

    def forward(self, x, mask):
        y = self.self_attn(self.norm1(x), mask)
        x = x + y if self.in_size == self.size else y
        return x + self.feed_forward(self.norm2(x))


class SenseVoiceEncoderSmall(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["output_size"]
        self.d = d
        self.encoders0 = nn.ModuleList([EncoderLayerSANM(c["input_size"], d, c)])
        self.encoders = nn.ModuleList([EncoderLayerSANM(d, d, c) for _ in range(c["num_blocks"] - 1)])
        self.after_norm = LayerNorm(d)
        self.tp_encoders = nn.ModuleList([EncoderLayerSANM(d, d, c) for _ in range(c["tp_blocks"])])
        self.tp_norm = LayerNorm(d)

    def forward(self, xs, ilens):
        t = xs.shape[1]
        masks = (torch.arange(t)[None, :] < ilens[:, None]).to(torch.bfloat16)[:, None, :]  # bf16, [N, 1, T]
        xs = xs * self.d ** 0.5
        xs = xs + sinusoidal_encode(t, xs.shape[-1], xs.dtype)
        for layer in [*self.encoders0, *self.encoders]:
            xs = layer(xs, masks)
        xs = self.after_norm(xs)
        olens = (masks.squeeze(1) > 0.5).sum(1).int()
        for layer in self.tp_encoders:
            xs = layer(xs, masks)
        return self.tp_norm(xs), olens


class CTC(nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.ctc_lo = nn.Linear(d, vocab)


class SenseVoiceSmall(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(16, c["input_size"])
        self.encoder = SenseVoiceEncoderSmall(c)
        self.ctc = CTC(c["vocab_size"], c["output_size"])

    def inference_encode(self, speech, lengths):
        n = speech.shape[0]
        queries = self.embed(torch.tensor([[0, 1, 2, 15]])).repeat(n, 1, 1)  # lid auto, event, emotion, woitn
        return self.encoder(torch.cat([queries, speech], dim=1), lengths + 4)


def audio_encoder(model, feats):
    """`AudioEncoder.forward`: a list of [T_k, 560] float32 -> (encoder_out [N, T_max+4, D], lengths)."""
    lens = torch.tensor([f.shape[0] for f in feats])
    speech = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(torch.bfloat16)
    return model.inference_encode(speech, lens)


class ResamplerProjector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.pre_proj_layernorm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.GELU(), nn.Linear(out_dim, out_dim, bias=False))

    def forward(self, x):
        return self.mlp(self.pre_proj_layernorm(x))


def tiny_config(**changes):
    """Matches `SenseVoiceConfig.tiny()`."""
    c = dict(input_size=560, output_size=32, attention_heads=2, linear_units=64, num_blocks=3, tp_blocks=2,
             kernel_size=11, vocab_size=50)
    return {**c, **changes}


def random_speech(c, hidden_size, seed=0):
    """(SenseVoiceSmall, ResamplerProjector) with random weights, non-trivial norms and biases, in eval mode."""
    torch.manual_seed(seed)
    sv, proj = SenseVoiceSmall(c).eval(), ResamplerProjector(c["output_size"], hidden_size).eval()
    with torch.no_grad():
        for name, p in [*sv.named_parameters(), *proj.named_parameters()]:
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name == "embed.weight":
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return sv, proj


def omni_state(sv, proj, dtype=torch.float32):
    """The speech keys as they sit in the Omni-Diffusion checkpoint (CTC head included)."""
    state = {f"model.audio_model.model.{k}": v for k, v in sv.state_dict().items()}
    state.update({f"model.audio_projection.{k}": v for k, v in proj.state_dict().items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------- resampling


def sinc_resample(wave, orig, new, width=6, rolloff=0.99):
    """torchaudio's default Resample: a Hann-windowed sinc polyphase filter. wave [N] float32 -> [ceil(N·new/orig)]."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    half = math.ceil(width * orig / base)
    idx = torch.arange(-half, half + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = (torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / orig)).float()
    x = F.pad(wave.float()[None, None], (half, half + orig))  # the kernel is built in fp64, applied in fp32
    out = F.conv1d(x, kernel, stride=orig).transpose(1, 2).reshape(-1)
    return out[:math.ceil(new * wave.numel() / orig)]
