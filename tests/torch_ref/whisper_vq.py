"""A PyTorch GLM-4-Voice tokenizer (WhisperVQEncoder, `modeling_whisper.py`) with the reference's names.

Written from a description of the reference, independently of our JAX code: Conv1d layers fed a left zero-padded input,
nn.Embedding positions and codebook, eager attention with the additive block-causal mask built per batch row, AvgPool1d,
and the addmm distance of the reference's `vector_quantize`. The front end is transformers' `WhisperFeatureExtractor`
itself, called as the reference's `extract_speech_token` calls it.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def tiny_config(**changes):
    """A reference-format config.json dict: the released settings (glm-4-voice-tokenizer `config.json`) at test size."""
    c = {
        "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "d_model": 64, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128, "encoder_layers": 4, "num_mel_bins": 128, "max_source_positions": 1500,
        "vocab_size": 51866, "pooling_kernel_size": 4, "pooling_type": "avg", "pooling_position": 2,
        "quantize_position": 2, "quantize_vocab_size": 64, "quantize_encoder_only": True,
        "quantize_causal_block_size": 200, "quantize_causal_encoder": False, "encoder_causal_convolution": True,
        "encoder_causal_attention": False, "quantize_commit_coefficient": 0.25, "quantize_loss_scale": 10.0,
        "quantize_ema_decay": 0.99, "quantize_restart_interval": 100, "scale_embedding": False,
        "activation_function": "gelu", "dropout": 0.0, "encoder_layerdrop": 0.0, "torch_dtype": "float32",
    }
    c.update(changes)
    return c


class CausalConv1d(nn.Conv1d):
    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, additive_mask):
        B, T, D = x.shape
        split = lambda y: y.view(B, T, self.h, self.hd).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(x) * self.hd ** -0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        probs = torch.softmax(q @ k.transpose(2, 3) + additive_mask, dim=-1)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(B, T, D))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.self_attn = Attention(d, c["encoder_attention_heads"])
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, c["encoder_ffn_dim"])
        self.fc2 = nn.Linear(c["encoder_ffn_dim"], d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperVQEncoder(nn.Module):
    """`forward(input_features [B, mels, T], attention_mask [B, T])` -> (pooled [B, T/8, D], token ids [B, T/8])."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        d = c["d_model"]
        self.conv1 = CausalConv1d(c["num_mel_bins"], d, kernel_size=3)
        self.conv2 = CausalConv1d(d, d, kernel_size=3, stride=2)
        self.embed_positions = nn.Embedding(c["max_source_positions"], d)
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["quantize_position"])])
        self.codebook = nn.Embedding(c["quantize_vocab_size"], d)
        self.embed_positions2 = nn.Embedding(math.ceil(c["max_source_positions"] / c["pooling_kernel_size"]), d)
        self.register_buffer("ema_count", torch.ones(c["quantize_vocab_size"]))
        self.register_buffer("ema_weight", self.codebook.weight.data.clone())

    def block_causal_mask(self, valid):
        T, bs = valid.shape[1], self.c["quantize_causal_block_size"]
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        allowed |= torch.block_diag(*[torch.ones(min(bs, T - s), min(bs, T - s)) for s in range(0, T, bs)]).bool()
        allowed = allowed[None] & valid[:, None, :].bool()
        return ((1.0 - allowed.float()) * torch.finfo(torch.float32).min)[:, None]

    def forward(self, input_features, attention_mask):
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight[:x.shape[1]]
        mask = self.block_causal_mask(attention_mask[:, ::2])
        for layer in self.layers:
            x = layer(x, mask)
        x = x.permute(0, 2, 1)
        k = self.c["pooling_kernel_size"]
        if x.shape[-1] % k:
            x = F.pad(x, (0, k - x.shape[-1] % k))
        pooled = F.avg_pool1d(x, k).permute(0, 2, 1)
        flat = pooled.reshape(-1, pooled.shape[-1])
        cb = self.codebook.weight
        dist = torch.addmm((cb ** 2).sum(1) + (flat ** 2).sum(1, keepdim=True), flat, cb.t(), alpha=-2.0, beta=1.0)
        return pooled, dist.argmin(dim=1).reshape(pooled.shape[:2])


def random_whisper_vq(c, seed=0):
    torch.manual_seed(seed)
    m = WhisperVQEncoder(c).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights catch a dropped scale
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() > 1 and "embed" not in name and "codebook" not in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        # A quiet input path (like Whisper's small sinusoid positions) leaves the first LayerNorm's variance
        # near 1e-3, where its eps (1e-5, not Flax's 1e-6) shows in the output.
        m.conv2.weight.mul_(0.03)
        m.conv2.bias.mul_(0.03)
        m.embed_positions.weight.mul_(0.03)
    return m


def fit_codebook(model, features, attention_mask, seed=0):
    """Sets the codebook to noisy copies of pooled frames, as a trained one would be, so that codes vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pooled, _ = model(features, attention_mask)
        frames = pooled[attention_mask[:, ::8].bool()]
        pick = torch.randint(len(frames), (model.codebook.weight.shape[0],), generator=g)
        chosen = frames[pick] + 0.05 * frames.std() * torch.randn(len(pick), frames.shape[1], generator=g)
        model.codebook.weight.copy_(chosen)
        model.ema_weight.copy_(chosen)


def save_checkpoint(model, folder, c, prefix="", extra=None):
    """The Hugging Face folder layout: config.json + model.safetensors (keys optionally under `prefix`)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    (folder / "config.json").write_text(json.dumps(c))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def feature_extractor():
    """transformers' WhisperFeatureExtractor with the released preprocessor_config.json values (no download)."""
    from transformers import WhisperFeatureExtractor
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30,
                                   n_fft=400, padding_value=0.0, padding_side="right")


def features(fe, waves):
    """The reference's feature call: pad the batch to its longest clip, rounded up to 1280 samples."""
    out = fe(waves, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", padding="longest",
             pad_to_multiple_of=1280)
    return out["input_features"], out["attention_mask"]


def extract_speech_token(model, fe, waves, batch_size=128):
    """The reference pipeline on 16 kHz clips: 30 s segments, batched features, model, mask, concatenation."""
    segments, owner = [], []
    for i, w in enumerate(waves):
        for start in range(0, len(w), 480000):
            segments.append(np.asarray(w[start:start + 480000], np.float32))
            owner.append(i)
    tokens = [[] for _ in waves]
    with torch.no_grad():
        for s in range(0, len(segments), batch_size):
            feats, mask = features(fe, segments[s:s + batch_size])
            _, ids = model(feats, mask)
            keep = mask[:, ::2][:, ::4].bool()
            for row in range(len(ids)):
                tokens[owner[s + row]].extend(ids[row][keep[row]].tolist())
    return tokens
