"""Dream-7B, the bidirectional Qwen2.5-shaped transformer at the heart of Omni-Diffusion, in Flax Linen.

Follows Omni-Diffusion's Dream, `omni_diffusion/models/dream/modeling_dream.py`:

    x = embed_tokens[ids]                                  (or caller-supplied inputs_embeds)
    for each of num_layers layers (pre-norm):
        h = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = rms_norm(x)
        x = h + down_proj(silu(gate_proj(m)) * up_proj(m))                  m = rms_norm(h)
    logits = rms_norm(x) @ lm_head.T                       (untied; lm_head [V, H] as PyTorch stores it)

Faithful details: q/k/v projections have biases, o_proj does not; RoPE is rotate-half with cos/sin computed in
fp32 and cast to the compute dtype; RMSNorm normalises in fp32, casts back to the input dtype, *then* multiplies
by the weight; attention is bidirectional (no causal mask anywhere). In bf16 every op's output is rounded where
PyTorch's is, including the one XLA's default compile would keep in float32 (`round_to`). Logits are unshifted:
the reference convention is that the output at position i-1 predicts the token at i (the sampler and loss shift).

The output head is a [vocab, hidden] table used like a tied embedding (`nn.Embed.attend`) rather than a
[hidden, vocab] `Dense` kernel: the released checkpoint stores it that way, so importing, exporting and loading
the 1.3 GB table needs no transpose, and the matmul is the same either way.

Two layouts of the same parameters: training runs the layers under `nn.scan` (stacked on a leading `layers`
axis, the checkpoint layout) with a configurable remat policy; inference (`OmniModel`, the sampler) holds one tree
per layer (`unstack_layers`) and `decode_functions` runs the layers one after another, so no pass copies a layer's
weights out of a stack. Parameters and activations carry logical axis names; `omnidiff_jax.sharding` maps them to
mesh axes.

For the sampler's caches, a decode pass can take a `KVCache` (every layer's keys and values over a whole canvas)
and run over a window of the canvas only: the window's keys and values are written in place and its queries
attend to every column through the same attention backends and sharding constraints as a plain pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from omnidiff_jax.attention import dot_product_attention
from omnidiff_jax.models.layers import Dense, round_to
from omnidiff_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class DreamConfig:
    """Shape and numerics of a Dream transformer. `omni_diffusion_7b()` is the released model."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072  # the longest sequence (prompt + generation) the model takes
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> "DreamConfig":
        return dataclasses.replace(self, **changes)


def _init(initializer, *names):
    return nn.with_logical_partitioning(initializer, names)


_normal = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """Llama-style RMSNorm with the reference cast order: normalise in fp32, cast, then scale."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", _init(nn.initializers.ones, "norm"), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        # torch.rsqrt on CPU is 1 / sqrt, each rounded; XLA's rsqrt (which it also makes of 1 / sqrt) is an
        # approximation one ulp off for ~1/3 of inputs, which flips bf16 outputs: the barrier keeps the sqrt apart
        root = jax.lax.optimization_barrier(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return weight.astype(self.dtype) * (x32 * (1 / root)).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, L, head_dim] for rotate-half RoPE: computed in fp32, then cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, D]; rotate_half(x) = concat(-x[D/2:], x[:D/2]) (GPT-NeoX pairing, not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    config: DreamConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, query_valid, cache=None, queries=None):
        """x [B, W, H] -> [B, W, H]. cache: None (keys are x's own positions), or this layer's (k, v, key segment ids,
        start) over a whole canvas (k, v [B, L, Hkv, D]; key segment ids [B, L]; start [B]): x's keys and values
        are written at columns [start, start + W) and x's queries attend to all L keys. queries: None, or the
        columns [B, Wq] of x whose outputs are wanted: only they go through the output projection and the output is
        [B, Wq, H]. Returns (out, (k, v))."""
        cfg = self.config
        dense = lambda features, axis, names, bias, name: Dense(  # noqa: E731  PyTorch's bf16 rounding
            features, axis=axis, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            kernel_init=_init(_normal, *names), bias_init=_init(nn.initializers.zeros, *names[-2:]))
        q = dense((cfg.num_heads, cfg.head_dim), -1, ("embed", "q_heads", "head_dim"), True, "q_proj")(x)
        k = dense((cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"), True, "k_proj")(x)
        v = dense((cfg.num_kv_heads, cfg.head_dim), -1, ("embed", "kv_heads", "head_dim"), True, "v_proj")(x)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_segment_ids = segment_ids
        if cache is not None:
            past_k, past_v, key_segment_ids, start = cache
            k, v = (constrain(_write_window(past, new, start),
                              ("activation_batch", "activation_length", "activation_heads", None))
                    for past, new in ((past_k, k), (past_v, v)))
        out = dot_product_attention(q, k, v, segment_ids=segment_ids, key_segment_ids=key_segment_ids,
                                    query_valid=query_valid, implementation=cfg.attention_impl)  # [B, W, Hq, D]
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
        out = out if queries is None else take_columns(out, queries)
        out = dense(cfg.hidden_size, (-2, -1), ("q_heads", "head_dim", "embed"), False, "o_proj")(out)
        return out, (None if cache is None else (k, v))


def take_columns(x: jax.Array, columns: jax.Array) -> jax.Array:
    """x [B, L, ...] at the columns [B, W] of each row: [B, W, ...]."""
    return jnp.take_along_axis(x, columns.reshape(columns.shape + (1,) * (x.ndim - 2)), axis=1)


def _write_window(past: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """past [B, L, ...] with new [B, W, ...] written at columns [start_b, start_b + W) of each row b."""
    write = lambda p, n, s: jax.lax.dynamic_update_slice_in_dim(p, n.astype(p.dtype), s, axis=0)  # noqa: E731
    return jax.vmap(write)(past, new, start)


class MLP(nn.Module):
    config: DreamConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            kernel_init=_init(_normal, *names))
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        gate = nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)  # rounded once, as torch's bf16 silu
        h = constrain(gate * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
    config: DreamConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, query_valid, kv=None, key_segment_ids=None, start=None, queries=None):
        """One pre-norm layer; kv: this layer's cached (k, v) or None (see `Attention`); queries: the columns [B, Wq]
        whose outputs are wanted (None: all). Returns (x, new kv)."""
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        cache = None if kv is None else (*kv, key_segment_ids, start)
        attended, kv = Attention(cfg, name="self_attn")(norm("input_layernorm")(x), cos, sin, segment_ids,
                                                         query_valid, cache, queries)
        x = x if queries is None else take_columns(x, queries)
        # h feeds the next norm (which reads it in float32) and the second residual add: by default XLA would give
        # them the unrounded float32 sum where PyTorch has a bf16 tensor (top-1 against the reference's bf16 logits
        # 98.7 % instead of 99.8 %). Likewise `out` where the next norm reads it directly (layer after layer in
        # `decode_functions`); in the layer scan it is the carry, which XLA stores in bf16.
        h = round_to(x + attended, x.dtype)
        out = round_to(h + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(h)), x.dtype)
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), kv


class Dream(nn.Module):
    """The Dream LLM as it trains: layers under `nn.scan`, parameters stacked on a leading `layers` axis (the
    checkpoint layout). `__call__` returns logits [B, L, V] in the compute dtype (or the final hidden states)."""

    config: DreamConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     embedding_init=_init(_normal, "vocab", "embed"))
        layer = DecoderLayer
        if REMAT_POLICIES[cfg.remat_policy] is not None:
            layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        self.lm_head = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                embedding_init=_init(_normal, "vocab", "embed"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, L, H] in the compute dtype (a plain gather)."""
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None, query_valid=None,
                 return_hidden: bool = False):
        """input_ids [B, L] or inputs_embeds [B, L, H]; positions [B, L] (default arange);
        segment_ids [B, L] (default: one segment); query_valid [B, L] bool (default: all valid)."""
        cfg = self.config
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        positions = _positions(x, positions)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
        x, _ = self.layers(x, cos, sin, segment_ids, query_valid)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [B, L, H] -> logits [B, L, V] in the compute dtype."""
        logits = self.lm_head.attend(hidden)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))


def _positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
    """positions [B, L], by default 0..L-1 in every row of x [B, L, ...]."""
    if positions is not None:
        return positions
    b, length = x.shape[:2]
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))


# ------------------------------------------------------------------------------------------ per-layer decoding

def unstack_layers(params: dict, consume: bool = False) -> dict:
    """Dream's parameters with the scan's stacked layer leaves [num_layers, ...] split into one tree per layer:
    `params["layers"]` becomes a tuple, the layout `OmniModel` holds and `decode_functions` run on (MaxText's
    unscanned layers for inference). A scan over stacked weights copies each layer's weights out of the stack on
    every pass; with one buffer per layer nothing is copied (on CPU, `small`: the sampler's trunk 15 % faster).

    Leaves are jax arrays (each layer keeps the leaf's sharding over its other axes) or NumPy arrays (split into
    views). consume: delete each stacked jax array once it is split, so that memory peaks at the model plus one
    leaf instead of twice the layers (for callers that own the tree, such as the loaders). A tree whose layers are
    already split is returned as it is.
    """
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    leaves, treedef = jax.tree.flatten(stacked)
    parts = []
    for leaf in leaves:
        parts.append(_split(leaf))
        if consume and isinstance(leaf, jax.Array):
            leaf.delete()
    layers = tuple(jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(len(parts[0])))
    return {**params, "layers": layers}


def _split(leaf) -> tuple:
    """A stacked leaf [n, ...] as n arrays [...]; a sharded one keeps its sharding over the other axes."""
    if not isinstance(leaf, jax.Array):
        return tuple(leaf)
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):  # the layers axis is never split (sharding.LOGICAL_RULES)
        return jax.jit(tuple, out_shardings=sharding.update(spec=PartitionSpec(*sharding.spec[1:])))(leaf)
    return jax.jit(tuple)(leaf)  # an array not committed to a device stays uncommitted


def stack_layers(params: dict) -> dict:
    """The inverse of `unstack_layers`: per-layer trees stacked back into the scan's layout (training, export)."""
    layers = params["layers"]
    if not isinstance(layers, tuple):
        return params
    stack = lambda *xs: (jnp.stack if isinstance(xs[0], jax.Array) else np.stack)(xs)  # noqa: E731
    return {**params, "layers": jax.tree.map(stack, *layers)}


@struct.dataclass
class KVCache:
    """Every layer's keys (RoPE applied) and values over a whole canvas, with each column's segment id.

    `DecodeFunctions.hidden` given a cache covers a window of the canvas (columns [start, start + W) of each row):
    it writes the window's keys and values in place and its queries attend to every column, the window's fresh keys
    and the cached ones elsewhere. A pass over the whole canvas (start 0) fills the cache and computes exactly what
    a pass without one does. Reusing the keys outside the window while their tokens change is an approximation: a
    prefix cache windows everything after the prompt, a dual cache only the block being decoded.
    """

    k: jax.Array  # [layers, B, L, Hkv, D]
    v: jax.Array  # [layers, B, L, Hkv, D]
    segment_ids: jax.Array  # [B, L] int

    @classmethod
    def empty(cls, config: DreamConfig, segment_ids: jax.Array) -> KVCache:
        """A zero cache for canvases laid out as `segment_ids` [B, L]."""
        b, length = segment_ids.shape
        shape = (config.num_layers, b, length, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype), jnp.asarray(segment_ids))


class DecodeFunctions(NamedTuple):
    """Dream as a decode loop calls it, on per-layer parameters (`unstack_layers`): MaskGIT's `tokens_to_logits`,
    split where a diffusion sampler needs it (the final hidden states of the canvas, or of a window of it against a
    `KVCache`; every layer but the last over the canvas, then the last one on only the columns a step reads; the
    vocabulary head on only those columns)."""

    embed: Callable[[Any, jax.Array], jax.Array]  # (params, ids [B, L]) -> embeddings [B, L, H]
    hidden: Callable[..., Any]  # (params, embeds [B, W, H], positions [B, W] or None, segment_ids [B, W] or None
    #                             (required with a cache), query_valid [B, W] or None, cache, start [B])
    #                             -> final hidden [B, W, H], or (hidden, updated cache) when a KVCache is given
    trunk: Callable[..., jax.Array]  # (params, embeds [B, L, H], positions [B, L], segment_ids [B, L])
    #                                  -> the hidden states entering the last layer [B, L, H]
    last_layer: Callable[..., jax.Array]  # (params, trunk's output [B, L, H], positions, segment_ids, columns [B, W])
    #                                       -> final hidden [B, W, H] of those columns
    logits: Callable[[Any, jax.Array], jax.Array]  # (params, hidden [B, W, H]) -> logits [B, W, V]
    empty_cache: Callable[[jax.Array], KVCache]  # (segment ids of the canvas [B, L]) -> zero cache


@functools.lru_cache(maxsize=None)
def decode_functions(config: DreamConfig) -> DecodeFunctions:
    """The `DecodeFunctions` of a Dream with this config (one object per config, so jit caches keyed on it hit).

    The layers run one after another, each on its own parameters; the model's output is that of `Dream`'s scan."""
    module = Dream(config)
    layer = DecoderLayer(config)
    norm = RMSNorm(config.rms_norm_eps, config.dtype, config.param_dtype)

    def run_layers(params, layers, x, positions, segment_ids, query_valid=None, cache=None, start=None,
                   queries=None):
        """Layers `layers` (indices) over x, the last of them on only the `queries` columns when given."""
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, config.dtype)
        x = constrain(x.astype(config.dtype), ("activation_batch", "activation_length", "activation_embed"))
        for i in layers:
            kv = None if cache is None else (cache.k[i], cache.v[i])
            key_segment_ids = None if cache is None else cache.segment_ids
            x, kv = layer.apply({"params": params["layers"][i]}, x, cos, sin, segment_ids, query_valid, kv,
                                key_segment_ids, start, queries if i == layers[-1] else None)
            if cache is not None:
                cache = cache.replace(k=cache.k.at[i].set(kv[0]), v=cache.v.at[i].set(kv[1]))
        return x, cache

    def hidden(params, embeds, positions=None, segment_ids=None, query_valid=None, cache=None, start=None):
        if cache is not None and start is None:
            start = jnp.zeros(embeds.shape[0], jnp.int32)
        x, cache = run_layers(params, range(config.num_layers), embeds, _positions(embeds, positions), segment_ids,
                              query_valid, cache, start)
        x = norm.apply({"params": params["norm"]}, x)
        return x if cache is None else (x, cache)

    def trunk(params, embeds, positions, segment_ids):
        return run_layers(params, range(config.num_layers - 1), embeds, positions, segment_ids)[0]

    def last_layer(params, x, positions, segment_ids, columns):
        x = run_layers(params, range(config.num_layers - 1, config.num_layers), x, positions, segment_ids,
                       queries=columns)[0]
        return norm.apply({"params": params["norm"]}, x)

    return DecodeFunctions(
        embed=lambda params, ids: module.apply({"params": params}, ids, method=Dream.embed),
        hidden=hidden,
        trunk=trunk,
        last_layer=last_layer,
        logits=lambda params, h: module.apply({"params": params}, h, method=Dream.logits),
        empty_cache=lambda segment_ids: KVCache.empty(config, segment_ids))
