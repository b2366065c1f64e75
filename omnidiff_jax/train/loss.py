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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from omnidiff_jax.attention import segment_ids_from_positions
from omnidiff_jax.models.dream import Dream
from omnidiff_jax.train.data import AUDIO_PREFIX, IGNORE

OBJECTIVES = ("reference", "inverse_t")


def shifted_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position CE of logits[:, i] against labels[:, i+1] and its validity mask, both [B, L-1] float32."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0), valid.astype(jnp.float32)


def pack_losses(logits: jax.Array, labels: jax.Array, mask_prob: jax.Array | None = None,
                objective: str = "reference") -> tuple[jax.Array, jax.Array]:
    """(loss per pack [B], labelled-token count per pack [B]) for logits [B, L, V] and labels [B, L]."""
    if objective not in OBJECTIVES:
        raise ValueError(f"loss objective must be one of {OBJECTIVES}, got {objective!r}")
    ce, valid = shifted_cross_entropy(logits, labels)
    count = valid.sum(-1)
    if objective == "reference":
        return ce.sum(-1) / jnp.maximum(count, 1.0), count
    prob = mask_prob[:, 1:]
    weighted = jnp.where(valid > 0, ce / jnp.where(valid > 0, prob, 1.0), 0.0).sum(-1)
    return weighted / jnp.maximum((prob > 0).sum(-1), 1), count


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


def model_logits(module: Dream, params: dict, batch: dict, speech: SpeechEncoder | None = None,
                 frozen: dict | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Logits [B, L, V] of a packed batch: segments from the position resets, padded query rows invalid."""
    x = embed_inputs(module, params, batch, speech, frozen, rng)
    positions = batch["positions"]
    return module.apply({"params": params["dream"]}, inputs_embeds=x, positions=positions,
                        segment_ids=segment_ids_from_positions(positions), query_valid=batch["valid"])


def batch_loss(module: Dream, params: dict, batch: dict, objective: str = "reference",
               speech: SpeechEncoder | None = None, frozen: dict | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean pack loss of a micro-batch, and per-pack (loss, labelled-token count) for logging.

    `params` holds the trainable trees: "dream" and the speech projector's, if any."""
    logits = model_logits(module, params, batch, speech, frozen, rng)
    losses, counts = pack_losses(logits, batch["labels"], batch.get("mask_prob"), objective)
    return losses.mean(), {"pack_loss": losses, "pack_tokens": counts}
