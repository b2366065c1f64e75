"""Bidirectional grouped-query attention behind one function, with a backend per platform.

Masking follows the reference (Dream `modeling_dream.py`, `DreamModel.forward`): keys are visible to a query when both
lie in the same packed segment; queries marked invalid (padding) attend to nothing and output exactly 0, as PyTorch >=
2.5 SDPA does. Key-side padding is not masked: it belongs to the last segment. With `segment_ids=None` attention is
full.

Backends:
  xla     plain matmuls with an fp32 softmax; any platform, the reference for the others.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA GPUs, bf16/fp16).
  splash  the Pallas splash-attention kernel on TPU, with segment ids.
  auto    cudnn on GPU for half-precision inputs, splash on TPU, else xla.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from omnidiff_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_ALIGN = 128  # splash sequence lengths are padded to a multiple of this (the TPU lane width)
SPLASH_BLOCK = 512  # splash tile: the largest divisor of the padded length up to this
SPLASH_PAD_SEGMENT = 2**31 - 1  # the padding's segment id; real ones (from positions) lie in [-1, L)
KV_BLOCK = 512  # the xla backend's key block: PyTorch's CPU flash attention's kv split


def segment_ids_from_positions(position_ids: jax.Array) -> jax.Array:
    """A 0 in `position_ids` [B, L] starts a new segment: segment = cumsum(pos == 0) - 1 (the reference rule)."""
    return jnp.cumsum(position_ids == 0, axis=-1, dtype=jnp.int32) - 1


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
                          key_segment_ids: jax.Array | None = None, query_valid: jax.Array | None = None,
                          implementation: str = "auto") -> jax.Array:
    """Bidirectional attention with scale 1/sqrt(head_dim).

    q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv));
    Lk may differ from Lq (a window of queries over cached keys). segment_ids: [B, Lq] int or None (one segment);
    key_segment_ids: [B, Lk] (default: segment_ids, when Lk = Lq). query_valid: [B, Lq] bool or None (all valid).
    Returns [B, Lq, Hq, D] in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        implementation = auto_implementation(q.dtype)
    if key_segment_ids is None:
        key_segment_ids = segment_ids
    if implementation == "cudnn":
        out = _cudnn(q, k, v, segment_ids, key_segment_ids)
    elif implementation == "splash":
        out = _splash(q, k, v, segment_ids, key_segment_ids)
    else:
        out = xla_attention(q, k, v, segment_ids, key_segment_ids)
    if query_valid is not None:
        out = out * query_valid[:, :, None, None].astype(out.dtype)
    return out


def auto_implementation(dtype) -> str:
    """The backend "auto" picks for inputs of `dtype` on this platform."""
    platform = jax.default_backend()
    if platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def xla_attention(q, k, v, q_segments=None, k_segments=None):
    """The XLA backend. q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] (Lk may exceed Lq, e.g. cached prompt keys); a key
    is visible to a query of the same segment (q_segments [B, Lq], k_segments [B, Lk]; None = one segment).

    Accelerators get every head in one batched matmul: each kv head serves its g query heads as one
    [g*Lq, D] x [D, Lk] product. On CPU the query heads run one after another (`lax.map`), so each [Lq, Lk]
    score matrix stays in cache: 2.5x faster at batch 4, length 512, where the batched scores (50 MB) spill.
    Either way the weights are normalised after the PV matmul, which saves a pass over the scores.

    In bf16 this rounds as PyTorch's x86 CPU `scaled_dot_product_attention` (its flash kernel, the reference's
    path): fp32 scores scaled in fp32, the kernel's fast exponential (`_fast_exp`), the unnormalised weights
    rounded to bf16 for the PV matmul, fp32 accumulation, the fp32 output times the reciprocal of the weights' fp32
    sum, one rounding at the end. The kernel leaves the last (keys mod 16) keys to the exact exp; here that rule
    counts, for each query, the keys it sees: the reference (batch 1) has no padding keys, and the sampler's
    padding lies in a segment of its own, so a padded canvas rounds as the unpadded reference does. (PyTorch with a
    packed-segment mask counts all Lk keys instead: segments of 50, 45 and 33 keys leave 0.4 % of outputs an ulp
    off here.) Limit: over KV_BLOCK keys each block applies the rule to its own length, padding included, since
    the reference's blocks would be of visible keys, not of canvas columns."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv  # query head h reads kv head h // g
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, Lk, D]
    same = None if q_segments is None else jnp.equal(q_segments[:, :, None], k_segments[:, None, :])  # [B, Lq, Lk]
    exact = None  # [B, Lq, Lk]: the keys the fast exponential leaves to the exact one, by rank among the visible
    if same is not None and v.dtype.itemsize < 4 and k.shape[1] <= KV_BLOCK:
        rank = jnp.cumsum(same, axis=-1, dtype=jnp.int32) - 1
        exact = rank >= (rank[..., -1:] + 1) // 16 * 16
    if jax.default_backend() == "cpu":
        def one_head(args):
            i, qi = args  # qi [Lq, D] is query head i % Hq of row i // Hq
            row, head = i // hq, i % hq // g
            return _attend(qi, kh[row, head], vh[row, head], *(None if m is None else m[row] for m in (same, exact)))

        out = jax.lax.map(one_head, (jnp.arange(b * hq), q.transpose(0, 2, 1, 3).reshape(b * hq, lq, d)))
        return out.reshape(b, hq, lq, d).transpose(0, 2, 1, 3).astype(q.dtype)
    qh = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    if same is not None:  # [B, 1, g*Lq, Lk]: row r of a group is query position r % Lq
        same, exact = (None if m is None else jnp.tile(m, (1, g, 1))[:, None] for m in (same, exact))
    out = _attend(qh, kh, vh, same, exact)  # [B, Hkv, g*Lq, D]
    return out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d).astype(q.dtype)


def _attend(q, k, v, visible, exact=None):
    """softmax(q k^T / sqrt(D)) v in fp32 over [..., Lq, D] x [..., Lk, D]; `visible` [..., Lq, Lk] bool or None.
    Returns fp32. Keys go in blocks of KV_BLOCK with a running maximum (online softmax), as PyTorch's CPU kernel
    takes them: the half-precision weights of a block are rounded relative to the maximum so far.

    In half precision the weights are `_fast_exp`'s but for the keys `exact` [..., Lq, Lk] marks (Lk <= KV_BLOCK
    only), which get the exact exp; with `exact=None` the last (block length mod 16) keys of each block do."""
    scale = jnp.float32(1 / math.sqrt(q.shape[-1]))
    half = v.dtype.itemsize < 4
    out = total = peak = None
    for lo in range(0, k.shape[-2], KV_BLOCK):
        hi = min(lo + KV_BLOCK, k.shape[-2])
        scores = jnp.matmul(q, k[..., lo:hi, :].swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
        if visible is not None:
            scores = jnp.where(visible[..., lo:hi], scores, -jnp.inf)
        block_peak = scores.max(axis=-1, keepdims=True)  # [..., Lq, 1]
        new_peak = block_peak if peak is None else jnp.maximum(peak, block_peak)
        shift = jnp.where(new_peak > -jnp.inf, new_peak, 0.0)  # rows with no visible key yet get weights 0
        weights = jnp.exp(scores - shift)
        if half:
            tail = jnp.arange(hi - lo) >= (hi - lo) // 16 * 16 if exact is None else exact
            weights = jnp.where(tail, weights, _fast_exp(scores - shift))
        pv = jnp.matmul(weights.astype(v.dtype), v[..., lo:hi, :], preferred_element_type=jnp.float32)
        if out is None:
            out, total = pv, weights.sum(axis=-1, keepdims=True)
        else:
            rescale = jnp.exp(peak - shift)
            out, total = out * rescale + pv, weights.sum(axis=-1, keepdims=True) + rescale * total
        peak = new_peak
    return out * (1 / total)  # every query sees at least one key


@jax.custom_jvp
def _fast_exp(x):
    """exp(x) for x <= 0 as PyTorch's CPU flash attention computes its half-precision softmax
    (`Vectorized<float>::fexp_u20`, after Malossi et al., "Fast exponential computation on SIMD architectures"):
    2^(x log2 e) with the fraction's correction a cubic, assembled in the float's bit pattern, ~1e-4 relative error.
    The kernel takes keys 16 at a time and leaves the last (keys mod 16) to the exact exp (`_attend`). Rounding the
    weights to bf16 makes the difference visible: with jnp.exp ~2 % of the attention outputs differ from the
    reference's by one ulp."""
    log2e = jnp.float32(1.4426950408889634)  # 0x3fb8aa3b
    t = x * log2e
    frac = t - jnp.floor(t)
    correction = ((frac * jnp.float32(-0.079204240219773236) + jnp.float32(-0.22433836478672356)) * frac
                  + jnp.float32(0.30354260500649682)) * frac + jnp.float32(0.00010703434948458272)
    bits = ((t - correction) * jnp.float32(2**23) + jnp.float32(127 * 2**23)).astype(jnp.int32)
    below = x < jnp.float32(-87.33654475)  # ln(FLT_MIN), 0xc2aeac50: the kernel flushes these to 0
    return jnp.where(below, 0.0, jax.lax.bitcast_convert_type(bits, jnp.float32))


@_fast_exp.defjvp
def _fast_exp_jvp(primals, tangents):
    y = _fast_exp(*primals)
    return y, y * tangents[0]


def _cudnn(q, k, v, q_segments, k_segments):
    mask = None
    if q_segments is not None:
        mask = (q_segments[:, :, None] == k_segments[:, None, :])[:, None]  # [B, 1, Lq, Lk]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _splash(q, k, v, q_segments, k_segments):
    """The Pallas splash kernel, as MaxText runs it: under an active mesh, per shard inside `shard_map` (batch
    split as `activation_batch`, query and kv heads as `activation_heads` when both divide, the sequence whole),
    with the kernel's head shards to match. The query and key lengths are padded to multiples of 128, the keys
    with a segment of their own (SPLASH_PAD_SEGMENT, seen by no real query); kv heads are grouped by the kernel
    itself. Off TPU the kernel runs in Pallas interpret mode (slow: for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, l, hq, d = q.shape

    def padded(x, segments):  # x [B, L, H, D] and its segments [B, L], padded to a multiple of SPLASH_ALIGN
        seg = jnp.zeros(x.shape[:2], jnp.int32) if segments is None else segments.astype(jnp.int32)
        pad = -x.shape[1] % SPLASH_ALIGN
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=SPLASH_PAD_SEGMENT)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), seg

    (q, q_seg), (k, k_seg), (v, _) = padded(q, q_segments), padded(k, k_segments), padded(v, None)
    block_q, block_kv = math.gcd(q.shape[1], SPLASH_BLOCK), math.gcd(k.shape[1], SPLASH_BLOCK)
    blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                           block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)
    # splash wants [H, L, D] per example and pre-scaled queries
    qh = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    current = sharding.active()
    batch_axes = head_axes = None
    if current is not None:
        mesh, rules = current
        names = ("activation_batch", "activation_heads", None, None)
        q_spec = sharding.logical_to_spec(names, qh.shape, mesh, rules)
        kv_spec = sharding.logical_to_spec(names, kh.shape, mesh, rules)
        batch_axes, head_axes = q_spec[0], q_spec[1] if q_spec[1] == kv_spec[1] else None
    head_shards = 1 if current is None else math.prod(
        current[0].shape[a] for a in ((head_axes,) if isinstance(head_axes, str) else head_axes or ()))
    mask = sm.MultiHeadMask([sm.FullMask((q.shape[1], k.shape[1])) for _ in range(hq)])
    kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=1,
                                interpret=jax.default_backend() != "tpu")

    def attend(kernel, qh, kh, vh, q_seg, k_seg):
        one = lambda qq, kk, vv, qs, ks: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(qs, ks))  # noqa: E731
        return jax.vmap(one)(qh, kh, vh, q_seg, k_seg)

    if current is None:
        out = attend(kernel, qh, kh, vh, q_seg, k_seg)
    else:
        heads = PartitionSpec(batch_axes, head_axes, None, None)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(head_axes, None)))
        rows = PartitionSpec(batch_axes, None)
        out = jax.shard_map(attend, mesh=mesh, in_specs=(kernel_spec, heads, heads, heads, rows, rows),
                            out_specs=heads, check_vma=False)(kernel, qh, kh, vh, q_seg, k_seg)
    return out.transpose(0, 2, 1, 3)[:, :l]
