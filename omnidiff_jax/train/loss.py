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
head and cross-entropy run in blocks of LOSS_CHUNK slots x VOCAB_CHUNK head rows under a custom VJP that keeps
one log-normaliser per slot and recomputes a block's logits in the backward pass; slot chunks past a batch's
last label are skipped. Both passes go row block by row block, so each block's head gradient is complete when
written and no float32 head-sized accumulator exists; under a mesh the head is never gathered whole (a row block
at a time, its gradient reduce-scattered back to the shards). At 8192 tokens this replaces a float32
[8192, 176264] array (5.8 GB, and as much again for its gradient) with [512, 8192] (17 MB) per pack.
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
LOSS_CHUNK = 512  # label slots scored at once
VOCAB_CHUNK = 8192  # head rows scored at once: float32 logits exist for [B, 512, 8192] at most


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def head_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, divisor: jax.Array,
                       chunk: int, vocab_chunk: int, embed_axes: tuple[str, ...]) -> jax.Array:
    """Per pack [B]: sum over slots j with a target of CE(logits[:, j], targets[:, j]) / divisor[:, j], where
    logits = hidden @ table.T in the table's dtype, upcast to float32 (`Dream.logits` and the loss's upcast).

    hidden [B, C, H]; table [V, H] (the output head, in the compute dtype); targets [B, C] with IGNORE slots last;
    divisor [B, C] > 0. The logits exist one block at a time: float32 [B, chunk, vocab_chunk] for `chunk` slots
    against `vocab_chunk` rows of the head, and only for the slot chunks up to the batch's last target. Both
    passes go row block by row block: the forward pass keeps each slot's log-normaliser (an online logsumexp);
    the backward pass recomputes the block's logits for every occupied slot chunk and writes the block's head
    gradient (summed over slots in float32) straight into its rows: no head-sized accumulator.

    Inside `shard_map`, `embed_axes` names the mesh axes the table's hidden axis is split over: each row block is
    gathered from them when it is scored (the whole head never is) and its gradient reduce-scattered back (in
    float32) to the device's own shard."""
    return _head_forward(hidden, table, targets, divisor, chunk, vocab_chunk, embed_axes)[0]


def _slots(x: jax.Array, k: jax.Array, chunk: int) -> jax.Array:
    """Slot chunk k of x [B, C, ...]: [B, chunk, ...]."""
    return jax.lax.dynamic_slice_in_dim(x, k * chunk, chunk, axis=1)


def _put_slots(x: jax.Array, value: jax.Array, k: jax.Array, chunk: int) -> jax.Array:
    """x [B, C, ...] with slot chunk k replaced by value [B, chunk, ...]."""
    return jax.lax.dynamic_update_slice_in_dim(x, value, k * chunk, axis=1)


def _occupied_chunks(targets: jax.Array, chunk: int) -> jax.Array:
    """How many leading slot chunks hold a target in some pack (targets [B, C], IGNORE slots last)."""
    return -(-jnp.max(jnp.sum(targets != IGNORE, axis=-1)) // chunk)


def _row_blocks(table: jax.Array, vocab_chunk: int) -> tuple[int, int]:
    """(rows per block, number of blocks) covering the head's V rows."""
    size = min(vocab_chunk, table.shape[0])
    return size, -(-table.shape[0] // size)


def _head_rows(table: jax.Array, c: jax.Array, size: int,
               embed_axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row block c of the head: (rows [size, H], their token ids [size], fresh [size]). The last block is moved
    back to end at V (no padded copy of the head), so its first rows may repeat the previous block's: `fresh`
    marks the rows no earlier block covered. A hidden axis split over `embed_axes` is gathered."""
    start = jnp.minimum(c * size, table.shape[0] - size)
    ids = start + jnp.arange(size)
    rows = jax.lax.dynamic_slice_in_dim(table, start, size)
    if embed_axes:
        rows = jax.lax.all_gather(rows, embed_axes, axis=1, tiled=True)
    return rows, ids, ids >= c * size


def _block_logits(h: jax.Array, rows: jax.Array) -> jax.Array:
    """h [B, T, H] @ rows.T in the head's dtype, upcast: float32 [B, T, size]."""
    return jnp.dot(h.astype(rows.dtype), rows.T).astype(jnp.float32)


def _head_forward(hidden, table, targets, divisor, chunk, vocab_chunk, embed_axes):
    """`head_cross_entropy`'s forward pass: (per-pack total [B], what the backward pass reads, with each slot's
    log-normaliser logz [B, C])."""
    size, blocks = _row_blocks(table, vocab_chunk)
    occupied = _occupied_chunks(targets, chunk)

    def row_block(c, acc):
        rows, ids, fresh = _head_rows(table, c, size, embed_axes)

        def slot_chunk(k, acc):  # online logsumexp over the row blocks, and the target's logit
            top, mass, picked = (_slots(x, k, chunk) for x in acc)  # [B, T] each
            t = _slots(targets, k, chunk)
            logits = jnp.where(fresh, _block_logits(_slots(hidden, k, chunk), rows), -jnp.inf)  # [B, T, size]
            new_top = jnp.maximum(top, logits.max(-1))
            mass = mass * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(-1)
            picked = picked + jnp.sum(jnp.where((ids == t[..., None]) & fresh, logits, 0.0), axis=-1)
            return tuple(_put_slots(x, v, k, chunk) for x, v in zip(acc, (new_top, mass, picked)))

        return jax.lax.fori_loop(0, occupied, slot_chunk, acc)

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape))
    top, mass, picked = jax.lax.fori_loop(0, blocks, row_block, init)
    logz = top + jnp.log(mass)  # [B, C]; -inf in slot chunks past the last target, which nothing reads
    total = jnp.sum(jnp.where(targets != IGNORE, (logz - picked) / divisor, 0.0), axis=-1)
    return total, (hidden, table, targets, divisor, logz)


def _head_backward(chunk, vocab_chunk, embed_axes, saved, grad):
    """`head_cross_entropy`'s backward pass: the gradients of hidden [B, C, H] and table [V, H] (none for the
    targets and divisors) from the per-pack cotangent grad [B]."""
    hidden, table, targets, divisor, logz = saved
    size, blocks = _row_blocks(table, vocab_chunk)
    scale = jnp.where(targets != IGNORE, grad[:, None] / divisor, 0.0)  # [B, C]
    occupied = _occupied_chunks(targets, chunk)

    def row_block(c, carry):
        d_table, d_hidden = carry
        rows, ids, fresh = _head_rows(table, c, size, embed_axes)
        fresh_rows = jnp.where(fresh[:, None], rows, 0)  # a repeated row's share of d_hidden is already in

        def slot_chunk(k, acc):
            d_rows, d_hidden = acc
            h, t, z = _slots(hidden, k, chunk), _slots(targets, k, chunk), _slots(logz, k, chunk)
            probs = jnp.exp(_block_logits(h, rows) - z[..., None])  # [B, T, size]
            g = ((probs - (ids == t[..., None])) * _slots(scale, k, chunk)[..., None]).astype(table.dtype)
            d_rows = d_rows + jnp.einsum("btv,bth->vh", g, h.astype(table.dtype), preferred_element_type=jnp.float32)
            d_h = _slots(d_hidden, k, chunk) + jnp.einsum("btv,vh->bth", g, fresh_rows,
                                                          preferred_element_type=jnp.float32)
            return d_rows, _put_slots(d_hidden, d_h, k, chunk)

        d_rows, d_hidden = jax.lax.fori_loop(0, occupied, slot_chunk,
                                             (jnp.zeros(rows.shape, jnp.float32), d_hidden))
        if embed_axes:
            d_rows = jax.lax.psum_scatter(d_rows, embed_axes, scatter_dimension=1, tiled=True)
        d_table = jax.lax.dynamic_update_slice_in_dim(d_table, d_rows.astype(table.dtype), ids[0], axis=0)
        return d_table, d_hidden

    init = (jnp.zeros(table.shape, table.dtype), jnp.zeros(hidden.shape, jnp.float32))
    d_table, d_hidden = jax.lax.fori_loop(0, blocks, row_block, init)
    return d_hidden.astype(hidden.dtype), d_table, None, None


head_cross_entropy.defvjp(_head_forward, _head_backward)


def sharded_head_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, divisor: jax.Array,
                               chunk: int, vocab_chunk: int) -> jax.Array:
    """`head_cross_entropy` with the packs split as activations are (`activation_batch`) when a mesh is active:
    each device scores its own packs and skips its own empty slot chunks. The head stays split over its hidden
    axis: a row block at a time is gathered, as FSDP gathers a layer's weights, and each block's gradient is
    reduce-scattered back to the shards; a vocabulary axis split over the mesh is gathered whole first (its
    gradient reduce-scattered by the gather's transpose)."""
    current = sharding.active()
    if current is None:
        return head_cross_entropy(hidden, table, targets, divisor, chunk, vocab_chunk, ())
    mesh, rules = current
    rows = sharding.logical_to_spec(("activation_batch",), hidden.shape[:1], mesh, rules)
    head = sharding.logical_to_spec(("vocab", "embed"), table.shape, mesh, rules)
    vocab_axes, embed_axes = (() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in head)

    def local(h, w, t, d):
        if vocab_axes:
            w = jax.lax.all_gather(w, vocab_axes, axis=0, tiled=True)
        return head_cross_entropy(h, w, t, d, chunk, vocab_chunk, embed_axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(*rows, None, None), head,
                                                     PartitionSpec(*rows, None), PartitionSpec(*rows, None)),
                         out_specs=rows, check_vma=False)(hidden, table, targets, divisor)


def pack_losses(hidden: jax.Array, table: jax.Array, labels: jax.Array, mask_prob: jax.Array | None = None,
                objective: str = "reference", dtype: str = "float32",
                chunk: int = LOSS_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """(loss per pack [B], labelled-token count per pack [B]) from the final hidden states [B, L, H], the output
    head `table` [V, H] (logits = hidden @ table.T in `dtype`) and labels [B, L]; only the labelled positions
    are scored, `chunk` of them against `vocab_chunk` rows of the head at a time (`head_cross_entropy`)."""
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
    total = sharded_head_cross_entropy(slots, table, targets, divisor, chunk, vocab_chunk)
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
    is_frame = (index >= 0) & (row >= AUDIO_PREFIX)
    clip = jnp.where(is_frame, index, a)  # out of range: dropped by the scatters
    frame = jnp.where(is_frame, row - AUDIO_PREFIX, 0)
    # Scatters and gathers per pack (vmap: the pack axis is a batch axis of each), so every device handles, and
    # encodes, only its own packs' clips.
    feats = jax.vmap(lambda c, f, x: jnp.zeros((a, t, x.shape[-1]), x.dtype).at[c, f].set(x, mode="drop"))(
        clip, frame, frames)  # [B, A, T, 560]
    lengths = jax.vmap(lambda c: jnp.zeros(a, jnp.int32).at[c].add(1, mode="drop"))(clip)  # [B, A]
    feats = constrain(feats, ("activation_batch", None, None, None))
    # Empty clip slots get one zero frame, so no fully masked (NaN) rows reach the projector's gradient.
    out = speech.embed(params, frozen, feats.reshape(b * a, t, -1), jnp.maximum(lengths, 1).reshape(-1), rng)
    out = constrain(out.reshape(b, a, *out.shape[1:]), ("activation_batch", None, None, "activation_embed"))
    picked = jax.vmap(lambda o, i, r: o[i, r])(out, jnp.maximum(index, 0), row)  # [B, L, H] from [B, A, T + 4, H]
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
