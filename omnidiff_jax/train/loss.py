"""The masked-diffusion training loss (Dream `modeling_dream.py`, transformers' `ForCausalLMLoss`) and the forward pass
it scores.

    logits = Dream(inputs with <|mask|>, per-sample positions, packed segments, padded queries invalid)
    ce_i   = cross_entropy(float32 logits[:, i], labels[:, i + 1])        the reference's causal-LM shift
    loss   = mean over packs of (sum of ce over labelled tokens / their count)

A pack's labels are exactly its masked supervised tokens, so this is HF `ForCausalLMLoss` on one packed sequence
(the reference runs one pack per micro-batch and per device) averaged over the packs of the batch. There is no
1/t weighting in the reference; `objective="inverse_t"` is the Dream/MDLM-style extension: each masked token is
weighted by 1 / (its masking probability) and the sum is divided by the pack's supervised-token count, an
unbiased estimate of the mean CE over all supervised tokens. A pack with no label contributes 0 (the reference
would produce NaN).

The logits are never materialised: only positions whose next token is labelled are scored, gathered to the
front of a static slot array (capacity L - 1 rounded up to LOSS_CHUNK, so no label is ever dropped), and the
head and cross-entropy run LOSS_CHUNK slots at a time under a custom VJP that keeps one log-normaliser per slot
and recomputes a chunk's logits in the backward pass; chunks past a batch's last label are skipped. At 8192
tokens this replaces a float32 [8192, 176264] array (5.8 GB, and as much again for its gradient) with
[512, 176264] (0.36 GB) per pack.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from omnidiff_jax import sharding
from omnidiff_jax.attention import segment_ids_from_positions
from omnidiff_jax.models.dream import Dream
from omnidiff_jax.sharding import constrain
from omnidiff_jax.train.data import AUDIO_PREFIX, IGNORE

OBJECTIVES = ("reference", "inverse_t")
LOSS_CHUNK = 512  # label slots per pack scored at once: float32 logits exist for [B, 512, V] at most


def supervised_slots(labels: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Where the loss reads the final hidden states: (order [B, C], targets [B, C]).

    order lists the positions i whose next label is set (labels[:, i + 1] != IGNORE, the causal-LM shift) first,
    in order, then the others; targets[:, j] = labels[:, order[:, j] + 1], IGNORE past a pack's labelled slots.
    The capacity C is L - 1 rounded up to a multiple of `chunk`: every possible label has a slot, so none is
    ever dropped whatever a pack holds, and chunks past the last label cost nothing (`head_cross_entropy`)."""
    targets = labels[:, 1:]
    n = targets.shape[1]
    order = jnp.argsort(targets == IGNORE, axis=-1, stable=True)  # [B, L - 1]
    targets = jnp.take_along_axis(targets, order, axis=-1)
    pad = -(-n // chunk) * chunk - n
    return jnp.pad(order, ((0, 0), (0, pad))), jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, divisor: jax.Array,
                       chunk: int) -> jax.Array:
    """Per pack [B]: sum over slots j with a target of CE(logits[:, j], targets[:, j]) / divisor[:, j], where
    logits = hidden @ table.T in the table's dtype, upcast to float32 (`Dream.logits` and the loss's upcast).

    hidden [B, C, H]; table [V, H] (the output head, in the compute dtype); targets [B, C] with IGNORE slots last;
    divisor [B, C] > 0. Slots go `chunk` at a time, so float32 logits exist for [B, chunk, V] at most: the forward
    pass keeps only each slot's log-normaliser and the backward pass recomputes a chunk's logits to form its
    gradients (the head's accumulated in float32). A chunk holding no target is skipped in both passes."""
    return _head_forward(hidden, table, targets, divisor, chunk)[0]


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, C, ...] -> [C / chunk, B, chunk, ...], the scan's leading axis."""
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:]).swapaxes(0, 1)


def _chunk_logits(h: jax.Array, table: jax.Array) -> jax.Array:
    """h [B, T, H] @ table.T in the table's dtype, upcast: float32 [B, T, V]."""
    return jnp.dot(h.astype(table.dtype), table.T).astype(jnp.float32)


def _head_forward(hidden, table, targets, divisor, chunk):
    b = hidden.shape[0]

    def score(h, t, d):
        logits = _chunk_logits(h, table)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == t[..., None], logits, 0.0), axis=-1)
        return jnp.sum(jnp.where(t != IGNORE, (logz - picked) / d, 0.0), axis=-1), logz

    def skip(h, t, d):
        return jnp.zeros(b, jnp.float32), jnp.zeros(t.shape, jnp.float32)

    def body(total, xs):
        part, logz = jax.lax.cond(jnp.any(xs[1] != IGNORE), score, skip, *xs)
        return total + part, logz

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(divisor, chunk))
    total, logz = jax.lax.scan(body, jnp.zeros(b, jnp.float32), xs)
    return total, (hidden, table, targets, divisor, logz)


def _head_backward(chunk, saved, grad):
    hidden, table, targets, divisor, logz = saved

    def backward(d_table, h, t, d, z):
        logits = _chunk_logits(h, table)
        onehot = jnp.arange(logits.shape[-1]) == t[..., None]
        scale = jnp.where(t != IGNORE, grad[:, None] / d, 0.0)  # [B, T]
        g = ((jnp.exp(logits - z[..., None]) - onehot) * scale[..., None]).astype(table.dtype)  # [B, T, V]
        d_table = d_table + jnp.einsum("btv,bth->vh", g, h.astype(table.dtype), preferred_element_type=jnp.float32)
        return d_table, jnp.dot(g, table)  # d_h [B, T, H]

    def skip(d_table, h, t, d, z):
        return d_table, jnp.zeros(h.shape, table.dtype)

    def body(d_table, xs):
        return jax.lax.cond(jnp.any(xs[1] != IGNORE), backward, skip, d_table, *xs)

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(divisor, chunk), logz)
    d_table, d_hidden = jax.lax.scan(body, jnp.zeros(table.shape, jnp.float32), xs)
    d_hidden = d_hidden.swapaxes(0, 1).reshape(hidden.shape)
    return d_hidden.astype(hidden.dtype), d_table.astype(table.dtype), None, None


head_cross_entropy.defvjp(_head_forward, _head_backward)


def sharded_head_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, divisor: jax.Array,
                               chunk: int) -> jax.Array:
    """`head_cross_entropy` with the packs split as activations are (`activation_batch`) when a mesh is active:
    each device scores its own packs against the whole head (gathered once, in the compute dtype), skips its own
    empty chunks, and sums its head gradient locally; one all-reduce of that gradient per micro-batch (the
    transpose of the gather) replaces a reduction per chunk."""
    current = sharding.active()
    if current is None:
        return head_cross_entropy(hidden, table, targets, divisor, chunk)
    mesh, rules = current
    rows = sharding.logical_to_spec(("activation_batch",), hidden.shape[:1], mesh, rules)
    rows3 = PartitionSpec(*rows, None, None)
    rows2 = PartitionSpec(*rows, None)
    return jax.shard_map(lambda h, w, t, d: head_cross_entropy(h, w, t, d, chunk), mesh=mesh,
                         in_specs=(rows3, PartitionSpec(), rows2, rows2), out_specs=rows,
                         check_vma=False)(hidden, table, targets, divisor)


def pack_losses(hidden: jax.Array, table: jax.Array, labels: jax.Array, mask_prob: jax.Array | None = None,
                objective: str = "reference", dtype: str = "float32",
                chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """(loss per pack [B], labelled-token count per pack [B]) from the final hidden states [B, L, H], the output
    head `table` [V, H] (logits = hidden @ table.T in `dtype`) and labels [B, L]; only the labelled positions
    are scored, `chunk` of them at a time (`head_cross_entropy`)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"loss objective must be one of {OBJECTIVES}, got {objective!r}")
    order, targets = supervised_slots(labels, chunk)
    valid = targets != IGNORE
    count = valid.sum(-1).astype(jnp.float32)
    if objective == "reference":
        divisor, denominator = jnp.ones(targets.shape, jnp.float32), count
    else:
        prob = jnp.take_along_axis(mask_prob, order + 1, axis=-1)
        divisor = jnp.where(valid, prob, 1.0)
        denominator = (mask_prob[:, 1:] > 0).sum(-1)
    slots = jnp.take_along_axis(hidden, order[..., None], axis=1)  # [B, C, H]
    table = constrain(table.astype(dtype), ("vocab", "embed"))  # cast on the shards, before the gather
    total = sharded_head_cross_entropy(slots, table, targets, divisor, chunk)
    return total / jnp.maximum(denominator, 1.0), count


@dataclasses.dataclass(frozen=True)
class SpeechEncoder:
    """User speech for the LLM: `embed(params, frozen, frames [N, T, 560], lengths [N], rng) -> [N, T + 4, H]`
    runs the frozen encoder (weights `frozen`, passed to the step as an argument) and the trainable projector
    (in the step's `params`, which `params` here seeds); A = max_audios clips of at most T = max_frames
    frames fit in a pack."""

    embed: Callable
    params: dict
    frozen: dict
    max_audios: int
    max_frames: int


def embed_inputs(module: Dream, params: dict, batch: dict, speech: SpeechEncoder | None = None,
                 frozen: dict | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, L, H], with speech-encoder outputs written over the audio placeholders: the batch's
    `audio_index`/`audio_row` say which output row each placeholder receives (see data.PackSpec.pack)."""
    x = module.apply({"params": params["dream"]}, batch["input_ids"], method=Dream.embed)
    if "audio_index" not in batch:
        return x
    if speech is None:
        raise ValueError("the batch holds user speech but no speech encoder was given")
    index, row, frames = batch["audio_index"], batch["audio_row"], batch["audio_frames"]
    b, a, t = index.shape[0], speech.max_audios, speech.max_frames
    batch_row = jnp.arange(b)[:, None]
    is_frame = (index >= 0) & (row >= AUDIO_PREFIX)
    clip = jnp.where(is_frame, index, a)  # out of range: dropped by the scatters
    frame = jnp.where(is_frame, row - AUDIO_PREFIX, 0)
    feats = jnp.zeros((b, a, t, frames.shape[-1]), frames.dtype).at[batch_row, clip, frame].set(frames, mode="drop")
    lengths = jnp.zeros((b, a), jnp.int32).at[batch_row, clip].add(1, mode="drop")
    # Empty clip slots get one zero frame, so no fully masked (NaN) rows reach the projector's gradient.
    out = speech.embed(params, frozen, feats.reshape(b * a, t, -1), jnp.maximum(lengths, 1).reshape(-1), rng)
    out = out.reshape(b, a, *out.shape[1:])  # [B, A, T + 4, H]
    picked = out[batch_row, jnp.maximum(index, 0), row]
    return jnp.where((index >= 0)[..., None], picked.astype(x.dtype), x)


def model_hidden(module: Dream, params: dict, batch: dict, speech: SpeechEncoder | None = None,
                 frozen: dict | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Final hidden states [B, L, H] of a packed batch: segments from the position resets, padded query rows
    invalid."""
    x = embed_inputs(module, params, batch, speech, frozen, rng)
    positions = batch["positions"]
    return module.apply({"params": params["dream"]}, inputs_embeds=x, positions=positions,
                        segment_ids=segment_ids_from_positions(positions), query_valid=batch["valid"],
                        return_hidden=True)


def batch_loss(module: Dream, params: dict, batch: dict, objective: str = "reference",
               speech: SpeechEncoder | None = None, frozen: dict | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean pack loss of a micro-batch, and per-pack (loss, labelled-token count) for logging.

    `params` holds the trainable trees: "dream" and the speech projector's, if any."""
    hidden = model_hidden(module, params, batch, speech, frozen, rng)
    losses, counts = pack_losses(hidden, params["dream"]["lm_head"]["embedding"], batch["labels"],
                                 batch.get("mask_prob"), objective, module.config.dtype)
    return losses.mean(), {"pack_loss": losses, "pack_tokens": counts}
