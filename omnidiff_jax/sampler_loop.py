"""The sampler's device loop: the reference `_sample` (Omni-Diffusion `generation_utils.py`) as one jitted
`lax.while_loop` over a `SamplerState`, in the shape of MaskGIT's and MD4's decode loops.

The model comes in as functions (`models.dream.DecodeFunctions`: embeddings, every layer but the last over the
canvas and the last on chosen columns, or the final hidden states of a canvas window with a KV cache, the vocabulary
head), and the canvas layout and step tables as a `Plan` (`omnidiff_jax.sampler_plan`). One step, for every row at
once:

    hidden    = model over the canvas but its last layer (exact), or over a window against a KV cache (prefix / dual)
    columns   = what the step can commit: the still-masked columns of the current block (origin: its transfers)
    logits    = head(hidden[column - 1]) of those columns only      (CFG first, then the shift, as the reference;
                exact: the last layer runs on those columns only, with the keys and values of every column)
    x0, conf  = sample_tokens(logits)        / temperature -> top-p -> top-k -> repeat / position penalty -> softmax
    commit      the k most confident columns, k = max(1, int(M ratio)), all M at the block's last step

Only the columns a step can commit go through the last layer, the vocabulary head and the filters. Their number
shrinks as the block fills, so they run at the smallest width of a fixed ladder (`head_widths`) that holds every row's
columns, picked each step by `lax.switch`: shapes stay static and the tokens are those of the full computation.
Every filter works on the top (top_k + 16) candidates of each row instead of sorting the vocabulary: the
reference's filtered distribution has at most top_k (plus ties) non-zero entries, so this is exact. Under a mesh
`sample_tokens` runs in `shard_map`, rows split like the batch and logits like the vocabulary, so only each row's
candidates cross devices. The loop stops once no row that still has steps has a mask left.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from omnidiff_jax import sharding
from omnidiff_jax.models.dream import DecodeFunctions
from omnidiff_jax.models.layers import round_to
from omnidiff_jax.sampler_plan import CANVAS, PROMPT, Plan

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "entropy-penalty")
CACHES = ("prefix", "dual")
TOP_K_CHUNK = 128  # vocabulary chunk of `chunked_top_k`
MIN_TOP_K_CHUNK = 32  # the smallest chunk `_top_k_chunk` picks on CPU
TIE_ROOM = 16  # candidates kept beyond top_k, so logits tied with the top_k-th are kept as the reference keeps them
POSITION_PENALTY_FREE_ROWS = 100  # the first 100 rows are never position-penalised
MIN_HEAD_WIDTH = 8  # the narrowest head
# The last layer runs on at least this many columns: XLA's CPU matmuls round products of up to 16 rows differently
# from wider ones, and the exact sampler's hidden states are to be those of a pass over the whole canvas.
MIN_LAST_LAYER_WIDTH = 24


@struct.dataclass
class Knobs:
    """Runtime options (traced, so changing them does not recompile)."""

    alg: jax.Array  # index into ALGS
    temperature: jax.Array
    top_p: jax.Array
    alg_temp: jax.Array
    cfg_scale: jax.Array
    repeat_penalty: jax.Array
    max_position_penalty: jax.Array
    threshold: jax.Array  # with `Variant.threshold`: commit the block's masks whose x0 probability exceeds this


@dataclasses.dataclass(frozen=True)
class Variant:
    """Compile-time options: each value is its own program."""

    mask_id: int
    vocab_size: int
    top_k: int | None
    with_cfg: bool
    cache: str | None  # None (exact), or one of CACHES
    block_size: int | None  # the dual cache's window is one block (plus the column before it)
    record_history: bool
    threshold: bool = False  # confidence-threshold parallel decoding (Fast-dLLM): blocks end when they are full


@struct.dataclass
class SamplerState:
    """The loop carry. `tokens` is the generation region of every row's canvas (columns >= N_r hold 0)."""

    tokens: jax.Array  # [B, Nb] int32
    step: jax.Array  # [] int32, the global step (the same for every row)
    history: jax.Array  # [Nb, B, Nb] tokens after each step, or [0, B, Nb] when not recorded
    steps_run: jax.Array  # [B] steps each row has run (a row stops when no mask is left, as the reference breaks)
    block_lo: jax.Array  # [B] where the block of each row's last step starts (-1 before the first step)
    cache: Any  # models.dream.KVCache over the R model rows' canvases, or None without a cache


@struct.dataclass
class _Step:
    """Each row's schedule entry for the current step, [B] each."""

    block_lo: jax.Array
    block_hi: jax.Array
    ratio: jax.Array
    last: jax.Array
    active: jax.Array  # the row's schedule has this step
    runs: jax.Array  # active with a mask left (the reference breaks out of its loop once none is left)
    refresh: jax.Array  # the row runs and starts a block: caches are recomputed


@struct.dataclass
class _Noise:
    """The step's random draws, made for the whole batch so results do not depend on how it is sharded."""

    transfer: jax.Array  # [B, Nb] uniform: origin's per-position transfer draw
    order: jax.Array  # [B, Nb] Gumbel: alg_temp's sampling of positions without replacement
    token: jax.Array  # [B, Nb, K] Gumbel: temperature sampling among the candidates


def candidates(vocab: int, top_k: int | None) -> int:
    """How many of each row's logits the filters look at: top_k plus room for ties, or the whole vocabulary."""
    return vocab if top_k is None else min(vocab, top_k + TIE_ROOM)


def head_widths(nb: int) -> tuple[int, ...]:
    """The head widths a step can run at for a generation region of Nb columns: Nb, and below it powers of two
    and their halfway points (16, 24, 32, 48, ...) down to MIN_HEAD_WIDTH, so a step computes at most 50% more
    columns than it can commit."""
    below = {w for i in range(3, nb.bit_length()) for w in (1 << i, 3 << (i - 1)) if MIN_HEAD_WIDTH <= w < nb}
    return tuple(sorted(below)) + (nb,)


@functools.lru_cache(maxsize=32)
def program(model: DecodeFunctions, mesh, variant: Variant):
    """The jitted loop for one model, mesh and `Variant`: (params, plan, knobs, key) -> (tokens [B, Nb],
    history [Nb or 0, B, Nb], steps_run [B])."""

    def run(params, plan: Plan, knobs: Knobs, key):
        with sharding.activate(mesh):
            return _loop(model, mesh, variant, params, plan, knobs, key)

    # results replicated over the mesh, so that every process of a multi-process run can read them
    return jax.jit(run, out_shardings=None if mesh is None else NamedSharding(mesh, PartitionSpec()))


def _loop(model: DecodeFunctions, mesh, variant: Variant, params, plan: Plan, knobs: Knobs, key):
    rows = plan.prompt_ids.shape[0]
    b, nb = plan.tokens.shape
    # prompt-column embeddings, computed once: token embeddings with the given embeddings scattered in
    fixed = model.embed(params, plan.prompt_ids)
    fixed = fixed.at[jnp.arange(rows)[:, None], plan.feat_cols].set(plan.feats.astype(fixed.dtype), mode="drop")
    shortlist = _shortlister(mesh, variant, b)

    def body(state: SamplerState) -> SamplerState:
        j = state.step
        step = _current_step(variant, plan, state)
        hidden, first, cache = _model_pass(model, variant, params, plan, fixed, state.tokens, state.cache, step)
        keys = jax.random.split(jax.random.fold_in(key, j), 3)
        noise = _Noise(jax.random.uniform(keys[0], (b, nb)), jax.random.gumbel(keys[1], (b, nb)),
                       jax.random.gumbel(keys[2], (b, nb, candidates(variant.vocab_size, variant.top_k))))
        read = functools.partial(_head, model, params, variant, knobs, plan, hidden, first)
        tokens = _update(read, shortlist, variant, knobs, state.tokens, step, j, noise)
        tokens = sharding.constrain(tokens, ("activation_batch", "activation_length"))
        history = state.history.at[j].set(tokens) if variant.record_history else state.history
        return SamplerState(tokens, j + 1, history, state.steps_run + step.runs,
                            jnp.where(step.active, step.block_lo, state.block_lo), cache)

    def running(state: SamplerState):
        """Steps remain, and some row runs the next one."""
        return (state.step < plan.num_steps) & jnp.any(_current_step(variant, plan, state).runs)

    cache = None if variant.cache is None else model.empty_cache(plan.segments)
    t = plan.block_lo.shape[1] if variant.record_history else 0
    state = SamplerState(plan.tokens, jnp.int32(0), jnp.zeros((t, b, nb), jnp.int32), jnp.zeros(b, jnp.int32),
                         jnp.full(b, -1, jnp.int32), cache)
    state = jax.lax.while_loop(running, body, state)
    return state.tokens, state.history, state.steps_run


def _current_step(variant: Variant, plan: Plan, state: SamplerState) -> _Step:
    """Each row's step: its entry in the plan's tables, or with a confidence threshold the block of its first
    mask (the blocks before it are full). A row refreshes its caches when it runs in a new block."""
    table = lambda t: jax.lax.dynamic_index_in_dim(t, state.step, axis=1, keepdims=False)  # noqa: E731
    masked = state.tokens == variant.mask_id
    if variant.threshold:
        lo = jnp.argmax(masked, axis=1) // plan.block_size * plan.block_size
        hi = jnp.minimum(lo + plan.block_size, plan.gen_length)
        ratio, last = jnp.zeros(lo.shape, jnp.float32), jnp.zeros(lo.shape, bool)
    else:
        lo, hi, ratio, last = map(table, (plan.block_lo, plan.block_hi, plan.ratio, plan.last))
    active = table(plan.active)
    runs = active & jnp.any(masked, axis=1)
    return _Step(lo, hi, ratio, last, active, runs, runs & (lo != state.block_lo))


# ---------------------------------------------------------------------------------------------- the model pass

def _embeddings(model: DecodeFunctions, params, plan: Plan, fixed, tokens, start, width: int):
    """Model input embeddings [R, W, H] of canvas columns [start_r, start_r + W) of every model row r: the prompt
    columns' fixed embeddings, the generation region's token embeddings, zeros elsewhere."""
    rows, g = plan.prompt_ids.shape
    cols = start[:, None] + jnp.arange(width)  # [R, W]
    ids = jnp.take_along_axis(tokens[jnp.arange(rows) % tokens.shape[0]],
                              jnp.take_along_axis(plan.src, cols, axis=1), axis=1)
    kind = jnp.take_along_axis(plan.kind, cols, axis=1)[..., None]
    prompt = jnp.take_along_axis(fixed, jnp.minimum(cols, g - 1)[..., None], axis=1)
    e = model.embed(params, ids)
    return jnp.where(kind == CANVAS, e, jnp.where(kind == PROMPT, prompt, jnp.zeros_like(e)))


def _model_pass(model: DecodeFunctions, variant: Variant, params, plan: Plan, fixed, tokens, cache, step: _Step):
    """Hidden states [R, W, H] of canvas columns [first_r, first_r + W) of every model row r; returns
    (hidden, first [R], cache).

    Exact: the states entering the last layer over the whole canvas (`_head` runs the last layer). With a cache, the
    final states of the window the step reads (prefix cache: from the last prompt column on; dual cache: the current
    block and the column before it) against the cached keys of the rest. Rows that start a block first refresh
    their cache with a pass over the whole canvas, whose hidden states they use."""
    rows, length = plan.kind.shape
    g = plan.prompt_ids.shape[1]
    everything = jnp.zeros(rows, jnp.int32)
    if variant.cache is None:
        embeds = _embeddings(model, params, plan, fixed, tokens, everything, length)
        return model.trunk(params, embeds, plan.positions, plan.segments), everything, None
    batch_row = jnp.arange(rows) % tokens.shape[0]
    if variant.cache == "prefix":
        width = length - (g - 1)
        start = jnp.full(rows, g - 1, jnp.int32)
    else:
        width = min(variant.block_size + 1, length)
        start = jnp.minimum(g - 1 + step.block_lo[batch_row], length - width)
    window = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, width, axis=0))
    refresh = step.refresh[batch_row]

    def refreshed(cache):
        embeds = _embeddings(model, params, plan, fixed, tokens, everything, length)
        hidden, fresh = model.hidden(params, embeds, plan.positions, plan.segments, cache=cache, start=everything)
        keep = refresh[None, :, None, None, None]
        cache = cache.replace(k=jnp.where(keep, fresh.k, cache.k), v=jnp.where(keep, fresh.v, cache.v))
        return window(hidden, start), cache

    def unchanged(cache):
        return jnp.zeros((rows, width, fixed.shape[-1]), fixed.dtype), cache

    def windowed(fresh_hidden, cache):
        embeds = _embeddings(model, params, plan, fixed, tokens, start, width)
        hidden, cache = model.hidden(params, embeds, window(plan.positions, start), window(plan.segments, start),
                                     cache=cache, start=start)
        return jnp.where(refresh[:, None, None], fresh_hidden, hidden), cache

    runs = step.runs[batch_row]
    fresh_hidden, cache = jax.lax.cond(jnp.any(refresh), refreshed, unchanged, cache)
    hidden, cache = jax.lax.cond(jnp.all(refresh | ~runs), lambda h, c: (h, c), windowed, fresh_hidden, cache)
    return hidden, start, cache


def _head(model: DecodeFunctions, params, variant: Variant, knobs: Knobs, plan: Plan, hidden, first, columns):
    """Shifted logits [B, W, V] of generation-region columns [B, W]: the head on the hidden state of the canvas
    column before each, CFG-mixed as the reference mixes them (un + (cfg_scale + 1)(cond - un), rounded where
    its bf16 math rounds). `hidden` covers canvas columns [first_r, first_r + Wh) of model row r (`_model_pass`:
    without a cache, the whole canvas before the last layer, which then runs on those columns only)."""
    rows, g = plan.prompt_ids.shape
    b, width = columns.shape
    at = jnp.clip(g - 1 + columns[jnp.arange(rows) % b] - first[:, None], 0, hidden.shape[1] - 1)
    if variant.cache is None:
        queries = jnp.pad(at, ((0, 0), (0, max(MIN_LAST_LAYER_WIDTH - width, 0))), mode="edge")
        h = model.last_layer(params, hidden, plan.positions, plan.segments, queries)[:, :width]
    else:
        h = jnp.take_along_axis(hidden, at[..., None], axis=1)
    logits = model.logits(params, h)  # constrained to the activation axes by Dream.logits
    if not variant.with_cfg:
        return logits
    dtype = logits.dtype
    cond, un = logits[:b].astype(jnp.float32), logits[b:].astype(jnp.float32)
    return (un + _round((knobs.cfg_scale + 1) * _round(cond - un, dtype), dtype)).astype(dtype)


# ------------------------------------------------------------------------------------------------ the update

def _update(read, shortlist, variant: Variant, knobs: Knobs, tokens, step: _Step, j, noise: _Noise):
    """One update of every row's generation region [B, Nb], the reference's `sample_tokens` and update rule.

    read(columns [B, W]) -> their shifted logits [B, W, V]; shortlist: `_shortlist` (in shard_map under a mesh).
    """
    b, nb = tokens.shape
    masked = tokens == variant.mask_id
    column = jnp.arange(nb)
    in_block = (column >= step.block_lo[:, None]) & (column < step.block_hi[:, None])
    is_origin = knobs.alg == ALGS.index("origin")
    transfer = masked & (noise.transfer < jnp.where(step.last, 1.0, step.ratio)[:, None])
    passed = jnp.where(is_origin, transfer, masked)  # the rows the reference passes to `sample_tokens`
    m = jnp.sum(masked & in_block, axis=1)
    # the columns the step can commit: origin's transfers; else the block's masks, or in a block that ran dry the
    # first mask (the reference then commits one out-of-block position, and ties go to the lowest)
    first_mask = masked & (jnp.cumsum(masked, axis=1) == 1)
    wanted = jnp.where(is_origin, transfer, (masked & in_block) | (first_mask & (m == 0)[:, None])) & step.runs[:, None]
    penalty = jnp.where((knobs.alg == ALGS.index("entropy-penalty")) & (j > 0), knobs.repeat_penalty, 1.0)
    generated = _generated_ids(tokens, variant.mask_id, variant.vocab_size)
    x0, confidence, probability = _decide_columns(read, shortlist, knobs, tokens, wanted, passed, generated,
                                                  penalty, noise.token, variant.top_k)

    # how many to commit, and which: top-k of the confidence over masked positions, out-of-block ones at -inf
    k = jnp.where(step.last, m, (m.astype(jnp.float32) * step.ratio).astype(jnp.int32))
    k = jnp.where(step.runs, jnp.maximum(k, 1), 0)
    confidence = jnp.where(in_block, confidence, -jnp.inf)
    sampled = confidence / jnp.where(knobs.alg_temp > 0, knobs.alg_temp, 1.0) + noise.order  # Gumbel top-k
    score = jnp.where(knobs.alg_temp > 0, sampled, confidence)
    order = jnp.lexsort((-score, ~masked), axis=1)  # masked first, then by score; ties: the lower column
    rank = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(column[None])
    if variant.threshold:  # Fast-dLLM: every mask of the block whose x0 is likely enough, else the best one
        sure = masked & in_block & (probability > knobs.threshold)
        commit = (sure | (masked & (rank == 0) & ~jnp.any(sure, axis=1, keepdims=True))) & step.runs[:, None]
    else:
        commit = jnp.where(is_origin, transfer & step.runs[:, None], masked & (rank < k[:, None]))
    return jnp.where(commit, x0, tokens)


def _decide_columns(read, shortlist, knobs: Knobs, tokens, wanted, passed, generated, repeat_penalty, gumbel,
                    top_k: int | None):
    """x0, confidence and x0's probability [B, Nb] of the `wanted` columns [B, Nb] (elsewhere x0 = tokens,
    confidence -inf, probability 0).

    The vocabulary-wide work (the head, the candidates' top-k, logsumexp) runs at the narrowest of `head_widths`
    that holds every row's wanted columns; the rest of `sample_tokens` works on the candidates of every column.
    passed [B, Nb]: the rows the reference passes to `sample_tokens` (their count and order drive the position
    penalty); generated [B, V]: the ids the repeat penalty applies to; gumbel [B, Nb, K]: temperature draws."""
    b, nb = tokens.shape
    count = gumbel.shape[-1]
    order = jnp.argsort(~wanted, axis=1, stable=True)  # the wanted columns first, in column order

    def at_width(width: int):
        """The shortlist of the first `width` columns of `order`, padded to Nb, and those columns (Nb = dropped)."""
        columns = order[:, :width]
        found = shortlist(read(columns), knobs, count)  # values, ids [B, W, K], logsumexp [B, W]
        target = jnp.where(jnp.take_along_axis(wanted, columns, axis=1), columns, nb)
        pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, nb - width)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                         constant_values=value)
        return pad(target, nb), *map(pad, found)

    # the scatter back to [B, Nb] is outside the branches: one copy of it compiles much faster than one per width
    widths = head_widths(nb)
    branch = jnp.searchsorted(jnp.asarray(widths), jnp.max(jnp.sum(wanted, axis=1)))
    target, *found = jax.lax.switch(branch, [functools.partial(at_width, w) for w in widths])
    row = jnp.arange(b)[:, None]
    values, ids, logsumexp = (jnp.zeros((b, nb) + x.shape[2:], x.dtype).at[row, target].set(x, mode="drop")
                              for x in found)
    rank = jnp.cumsum(passed, axis=1) - passed  # each column's index among the passed rows
    x0, confidence, probability = _pick(values, ids, logsumexp, rank, jnp.sum(passed, axis=1), generated, knobs,
                                        repeat_penalty, gumbel, top_k)
    return jnp.where(wanted, x0, tokens), jnp.where(wanted, confidence, -jnp.inf), jnp.where(wanted, probability, 0)


def _shortlister(mesh, variant: Variant, batch: int):
    """`_shortlist` run per device under a mesh: rows split like the batch, logits split over the vocabulary like
    the head's output, so only each row's candidates cross devices."""
    if mesh is None:
        return functools.partial(_shortlist, vocab_axes=None)
    rows = sharding.logical_to_spec(("activation_batch",), (batch,), mesh)[0]
    vocab = sharding.logical_to_spec(("activation_vocab",), (variant.vocab_size,), mesh)[0]
    if vocab is not None and candidates(variant.vocab_size, variant.top_k) == variant.vocab_size:
        vocab = None  # a full sort needs the whole row on one device anyway
    row_col = PartitionSpec(rows, None)
    shortlist = lambda logits, knobs, count: jax.shard_map(  # noqa: E731
        functools.partial(_shortlist, count=count, vocab_axes=vocab), mesh=mesh,
        in_specs=(PartitionSpec(rows, None, vocab), PartitionSpec()),
        out_specs=(PartitionSpec(rows, None, None),) * 2 + (row_col,), check_vma=False)(logits, knobs)
    return shortlist


# ----------------------------------------------------------------------------------- the reference's filters

def _round(x, dtype):
    """Rounds an intermediate to the logits dtype, where the reference's bf16 math rounds, and returns it in
    float32 (`models.layers.round_to`, which keeps the rounding inside XLA's fusions)."""
    return round_to(x, dtype).astype(jnp.float32)


def _top_k(x, count: int, vocab_axes, rescale=lambda v: v):
    """`lax.top_k` of rescale(x) over the last (vocabulary) axis, through `chunked_top_k` where that is faster
    (`_top_k_chunk`). When that axis is split over `vocab_axes`, each device takes its own top `count` first and
    only those candidates are gathered. Ties go to the lower id either way."""
    top_k = functools.partial(chunked_top_k, chunk=_top_k_chunk(x.shape[-1]), rescale=rescale)
    if vocab_axes is None:
        return top_k(x, count)
    part = x.shape[-1]
    values, ids = top_k(x, min(count, part))
    ids = ids + part * jax.lax.axis_index(vocab_axes)
    values = jax.lax.all_gather(values, vocab_axes, axis=x.ndim - 1, tiled=True)  # shard-major: ids ascend
    ids = jax.lax.all_gather(ids, vocab_axes, axis=x.ndim - 1, tiled=True)
    values, pick = jax.lax.top_k(values, count)
    return values, jnp.take_along_axis(ids, pick, axis=-1)


def _top_k_chunk(n: int) -> int:
    """The chunk `_top_k` runs `chunked_top_k` with over n logits (n itself: one chunk, a plain `lax.top_k`). GPUs
    sort for `lax.top_k`, so chunks pay there at any size (the last one padded). CPU's `lax.top_k` does not sort,
    and chunks pay there only unpadded (3x at 176,264 logits; padding would copy every row): the largest divisor
    of n from MIN_TOP_K_CHUNK to TOP_K_CHUNK, if there is one."""
    if jax.default_backend() == "gpu":
        return TOP_K_CHUNK
    if jax.default_backend() != "cpu":
        return n
    return next((c for c in range(TOP_K_CHUNK, MIN_TOP_K_CHUNK - 1, -1) if n % c == 0), n)


def chunked_top_k(x, count: int, chunk: int = TOP_K_CHUNK, rescale=lambda v: v):
    """`lax.top_k(x, count)` over the last axis, exactly (ties to the lower index), without sorting it whole; or
    of rescale(x) for a non-decreasing elementwise `rescale`, applied to the chunk maxima and the chosen chunks
    only (the max of rescale over a chunk is rescale of its max), so rescale(x) is never written out.

    The `count` largest entries lie in the `count` chunks with the largest maxima: an entry outside them is
    outranked by each of those maxima (larger, or equal and at a lower index). So only those chunks, kept in
    index order, go through `lax.top_k`. On an H100, 2048 rows of a 176k vocabulary take 2.1 ms instead of 25 ms
    (GPUs sort for `lax.top_k`); on CPU, 256 rows take 19 ms instead of 56 ms in chunks of 88.
    """
    n = x.shape[-1]
    if n <= 4 * chunk * count:
        return jax.lax.top_k(rescale(x), count)
    chunks = -(-n // chunk)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * chunk - n)], constant_values=-jnp.inf)
    padded = padded.reshape(*x.shape[:-1], chunks, chunk)
    _, best = jax.lax.top_k(rescale(padded.max(axis=-1)), count)  # [..., count] chunk ids
    best = jnp.sort(best, axis=-1)
    chosen = jnp.take_along_axis(padded, best[..., None], axis=-2).reshape(*x.shape[:-1], -1)
    values, pick = jax.lax.top_k(rescale(chosen), count)
    return values, jnp.take_along_axis(best, pick // chunk, axis=-1) * chunk + pick % chunk


def _logsumexp(x, top, vocab_axes):
    """float32 logsumexp over the last axis of x, whose maximum (over every device of `vocab_axes` when the axis is
    split) is `top` [...]: the shortlist's best value, so that no pass over x is spent finding it."""
    top = top.astype(jnp.float32)[..., None]
    total = jnp.sum(jnp.exp(x.astype(jnp.float32) - top), axis=-1, keepdims=True)
    if vocab_axes is not None:
        total = jax.lax.psum(total, vocab_axes)
    return (top + jnp.log(total))[..., 0]


def _generated_ids(tokens, mask_id: int, vocab_size: int):
    """[B, V] bool: the ids in each row's generation region the repeat penalty applies to (not 0, not the mask)."""
    generated = jnp.zeros((tokens.shape[0], vocab_size), bool)
    return generated.at[jnp.arange(tokens.shape[0])[:, None], tokens].set(True).at[:, 0].set(False).at[
        :, mask_id].set(False)


def sample_tokens(logits, rank, n, generated, knobs: Knobs, repeat_penalty, gumbel, *, top_k: int | None,
                  vocab_axes=None):
    """The reference's `sample_tokens` on rows of logits: returns x0 and the alg's confidence, both [B, W].

    logits [B, W, V] (the model dtype: the math rounds to it where the reference does); rank [B, W] and n [B]:
    each row's index among, and the number of, the rows the reference passes (they drive the position penalty);
    generated [B, V] marks the ids the repeat penalty applies to; gumbel [B, W, K] draws the temperature sample
    among the K = `candidates(V, top_k)` best logits; vocab_axes: the mesh axes the vocabulary is split over
    (inside shard_map), or None.
    """
    values, ids, logsumexp = _shortlist(logits, knobs, gumbel.shape[-1], vocab_axes)
    return _pick(values, ids, logsumexp, rank, n, generated, knobs, repeat_penalty, gumbel, top_k)[:2]


def _shortlist(logits, knobs: Knobs, count: int, vocab_axes):
    """The vocabulary-wide half of `sample_tokens`: the temperature-scaled logits' `count` best values (in the
    logits dtype) and ids [..., K], descending with ties to the lower id, and their float32 logsumexp [...] (which
    only top-p reads: 0 when top_p >= 1).

    No scaled copy of the rows is written for the top-k: at temperature 0 the scaled logits are the logits (divided
    by 1 and rounded to their own dtype), and above it the scaling is applied to the chunks `chunked_top_k` reads
    (only the logsumexp of top-p < 1 reads every scaled logit)."""
    dtype = logits.dtype

    def shortlist(logits, rescale=lambda v: v):  # the scaled logits are rescale(logits), in the logits dtype
        values, ids = _top_k(logits, count, vocab_axes, rescale)
        # their max is values[..., 0]; slicing that out would fold into top_k's own slice of the vocabulary's
        # sort, and XLA then leaves that sort whole instead of rewriting it into a top-k
        top = jnp.max(values, axis=-1)
        logsumexp = lambda logits, top: _logsumexp(rescale(logits), top, vocab_axes)  # noqa: E731
        unused = lambda logits, top: jnp.zeros(top.shape, jnp.float32)  # noqa: E731
        return values, ids, jax.lax.cond(knobs.top_p < 1, logsumexp, unused, logits, top)

    # x * (1 / T): how PyTorch's CUDA kernel divides by a scalar (the reference runs on CUDA) and what XLA's CPU
    # code made of x / T before (the same tokens); PyTorch on CPU divides, one float32 ulp away in ~9 % of entries
    # (no bf16 entry differs). Written out so that the chunk maxima, the chosen chunks and the logsumexp all round
    # alike; non-decreasing, as `_top_k` needs
    inverse = jnp.reciprocal(knobs.temperature)  # staged, so temperature 0 (the other branch) warns of nothing
    scale = lambda x: round_to(x.astype(jnp.float32) * inverse, dtype)  # noqa: E731
    return jax.lax.cond(knobs.temperature > 0, functools.partial(shortlist, rescale=scale), shortlist, logits)


def _pick(values, ids, logsumexp, rank, n, generated, knobs: Knobs, repeat_penalty, gumbel, top_k: int | None):
    """The rest of `sample_tokens`, on each row's candidates (`_shortlist`): top-p, top-k, the repeat and
    position penalties, softmax, then x0, the confidence and x0's probability [B, W]. The reference's filtered
    row is finfo.min outside the candidates, so this is the reference's math."""
    dtype = values.dtype  # the logits dtype
    values = values.astype(jnp.float32)
    low = jnp.finfo(dtype).min
    count = values.shape[-1]
    cumulative = _round(jnp.cumsum(_round(jnp.exp(values - logsumexp[..., None]), dtype), axis=-1), dtype)
    before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
    nucleus = (before <= knobs.top_p) | (jnp.arange(count) == 0) | (knobs.top_p >= 1)
    values = jnp.where(nucleus, values, low)
    if top_k is not None and top_k < count:
        values = jnp.where(values < values[..., top_k - 1:top_k], low, values)

    # repeat penalty on generated ids, then the position penalty on late rows
    hit = jnp.take_along_axis(generated[:, None, :], ids, axis=-1)
    away_from_zero = lambda v, m: jnp.where(v < 0, v * m, v / m)  # noqa: E731
    values = jnp.where(hit, _round(away_from_zero(values, repeat_penalty), dtype), values)
    free = POSITION_PENALTY_FREE_ROWS
    n = n[:, None]
    ramp = (rank - free).astype(jnp.float32) / jnp.maximum(n - free, 1).astype(jnp.float32)
    scale = jnp.where((n > free) & (rank >= free), ramp * (knobs.max_position_penalty - 1.0) + 1.0, 1.0)
    values = _round(away_from_zero(values, _round(scale, dtype)[..., None]), dtype)

    temperature = knobs.temperature
    probs = _round(jax.nn.softmax(values, axis=-1), dtype)
    best = jnp.max(probs, axis=-1)
    greedy = jnp.min(jnp.where(probs == best[..., None], ids, jnp.iinfo(jnp.int32).max), axis=-1)  # ties: lower id
    choice = jnp.argmax(jnp.log(probs) + gumbel, axis=-1)  # a draw from probs
    sampling = temperature > 0
    x0 = jnp.where(sampling, jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0], greedy)
    probability = jnp.where(sampling, jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0], best)
    top2 = jax.lax.top_k(probs, 2)[0]
    confidence = jnp.select(
        [knobs.alg == ALGS.index("topk_margin"), knobs.alg >= ALGS.index("entropy")],
        [_round(top2[..., 0] - top2[..., 1], dtype),
         _round(jnp.sum(_round(probs * _round(jnp.log(_round(probs + 1e-10, dtype)), dtype), dtype), axis=-1),
                dtype)],
        probability)
    return x0, confidence, probability
