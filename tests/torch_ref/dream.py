"""A PyTorch Dream (Omni-Diffusion `modeling_dream.py`) with the reference's state_dict names, for parity tests.

Written from a description of the reference, independently of our JAX code: nn.Linear layers, repeat_kv GQA, SDPA with a
boolean mask, the RMSNorm cast order, bf16-castable RoPE tables, and both forward paths (`forward` with the
packed-segment mask built per batch row, `forward_dream` with no mask).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]
        H = c["hidden_size"]
        self.q_proj = nn.Linear(H, self.h * self.d, bias=True)
        self.k_proj = nn.Linear(H, self.kv * self.d, bias=True)
        self.v_proj = nn.Linear(H, self.kv * self.d, bias=True)
        self.o_proj = nn.Linear(self.h * self.d, H, bias=False)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv, self.d).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)  # query head h reads kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, I = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Base(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"], padding_idx=c["pad_token_id"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class DreamModel(nn.Module):
    """`forward(input_ids, attention_mask, position_ids)` and `forward_dream(input_ids | inputs_embeds)`."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Base(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        d = c["hidden_size"] // c["num_attention_heads"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))

    def _run(self, x, position_ids, mask):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.model.embed_tokens(input_ids)
        seg = torch.cumsum(position_ids == 0, dim=1) - 1
        mask = (seg[:, :, None] == seg[:, None, :]) & attention_mask[:, :, None].bool()
        return self._run(x, position_ids, mask[:, None])  # [B, 1, L, L]: right for every batch size

    def forward_dream(self, input_ids=None, inputs_embeds=None):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        pos = torch.arange(L)[None].expand(B, L)
        return self._run(x, pos, None)


def tiny_hf_config(layout=None, **changes):
    """config.json dict of a tiny Dream in the reference's format (with our omnidiff_vocab layout field)."""
    from omnidiff_jax.config import dream_config, get_config, token_layout
    from omnidiff_jax.convert.dream import hf_config
    cfg = get_config("tiny")
    c = hf_config(dream_config(cfg), token_layout(cfg), "float32")
    c.update(changes)
    return c


def random_dream(c, seed=0):
    torch.manual_seed(seed)
    m = DreamModel(c).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights catch a dropped scale
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return m


def save_hf(model, folder, c, dtype=torch.float32, shards=1, extra=None):
    """Writes a Hugging Face style folder: config.json + safetensors (sharded with an index when shards > 1)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    keys = list(state)
    (folder / "config.json").write_text(json.dumps({**c, "torch_dtype": str(dtype).split(".")[-1]}))
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
