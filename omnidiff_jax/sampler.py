"""The masked-diffusion sampler: the reference `_sample` loop (Omni-Diffusion `generation_utils.py`) as one jit.

Per row, as the reference does it for one prompt:

    canvas = prompt ++ [MASK] * N                       (prompt embeddings, speech included, injected each step)
    for each block b (size block_size; one block of N by default), for i < S_b = int(len_b / N * min(steps, N)):
        t = linspace(1, eps, S_b + 1)                   (restarted in every block)
        logits[j] = model(canvas)[j - 1]                (CFG first: un + (cfg + 1)(cond - un); then the shift)
        every masked row: / temperature -> top-p -> top-k -> repeat penalty -> position penalty -> softmax
        x0, confidence per masked row by `alg`; out-of-block rows get confidence -inf
        commit the k most confident rows, k = max(1, int(M (1 - t[i+1] / t[i]))), all M at the last step
        (M: masks left in the block; `origin` instead commits each masked row with probability 1 - t[i+1]/t[i])

How it is compiled: every row's prompt is left-padded so that all generation regions start at the same column
G, and padding sits in its own attention segment, so a row's logits do not depend on its neighbours. Lengths
are rounded up to buckets (at most 25% over), so prompts and generation lengths within a bucket reuse one
program, whatever the step counts. The step schedule (block bounds, the float32 ratios 1 - t[i+1]/t[i], the
last-step flags) is a per-row table computed on the host with the reference's float32 arithmetic; the transfer
count k is computed on device from the live mask count, which reproduces the reference even when a block runs
dry. The whole loop is a `lax.while_loop` over a `SamplerState`; only the model shape, top_k, CFG on/off, the
prefix cache and history recording are compile-time constants. Only the logits of the generation window are
computed, and every filter works on the top (top_k + 16) candidates of each row instead of sorting the
vocabulary: the reference's filtered distribution has at most top_k (plus ties) non-zero entries, so this is
exact. Under a mesh the per-row update runs in `shard_map`, rows split like the batch and logits like the
vocabulary, so only each row's candidates cross devices.

Deliberate differences from the reference, all documented at `sample`:
- batch rows are independent (the reference pools the mask count, the repeat-penalty ids and the position
  ranks over the batch, and uses row 0's block flags);
- ties in the confidence top-k go to the lower position (torch's order is unspecified), which also decides the
  out-of-block position a dry block commits;
- `cfg_compat=False` (the default) aligns the unconditional row's generation region with the conditional one;
  `cfg_compat=True` reproduces the reference's zero-padded, position-misaligned row exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from omnidiff_jax import sharding
from omnidiff_jax.model import OmniModel
from omnidiff_jax.models.dream import Dream, DreamConfig
from omnidiff_jax.prefix_cache import run_layers

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "entropy-penalty")
EPS = 1e-3  # the final timestep, DreamGenerationConfig's default
TOP_K_CHUNK = 128  # vocabulary chunk of `_chunked_top_k`
TIE_ROOM = 16  # candidates kept beyond top_k, so logits tied with the top_k-th are kept as the reference keeps them
POSITION_PENALTY_FREE_ROWS = 100  # the first 100 rows are never position-penalised

# What fills a canvas column of a model row.
_PROMPT, _CANVAS, _ZERO = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: token ids [P], and optionally embeddings [T, hidden] that overwrite the token embeddings at
    `embed_positions` [T] (speech features on their `<|context_of_audio|>` placeholders, as Dream's forward)."""

    ids: Sequence[int] | np.ndarray
    embeds: np.ndarray | None = None
    embed_positions: Sequence[int] | np.ndarray | None = None


@struct.dataclass
class SamplerState:
    """The loop carry. `tokens` is the generation region of every row's canvas (columns >= N_r hold 0)."""

    tokens: jax.Array  # [B, Nb] int32
    step: jax.Array  # [] int32, the global step (the same for every row)
    history: jax.Array  # [Nb, B, Nb] tokens after each step, or [0, B, Nb] when not recorded
    steps_run: jax.Array  # [B] steps each row has run (a row stops when no mask is left, as the reference breaks)
    cache: Any  # (k, v), each [layers, R, G - 1, kv_heads, head_dim], or None without the prefix cache


@struct.dataclass
class _Inputs:
    """Everything the compiled program reads, as arrays (R model rows = B, or 2B with CFG)."""

    prompt_ids: jax.Array  # [R, G] ids of the prompt columns
    feats: jax.Array  # [R, F, hidden] embeddings overwriting prompt columns
    feat_cols: jax.Array  # [R, F] their columns (G = none)
    kind: jax.Array  # [R, L] _PROMPT / _CANVAS / _ZERO
    src: jax.Array  # [R, L] generation-region index a _CANVAS column reads
    positions: jax.Array  # [R, L] RoPE positions
    segments: jax.Array  # [R, L] 0 = the row's real sequence, 1 = padding
    tokens: jax.Array  # [B, Nb] the initial generation regions (mask, BOA prefill, 0 beyond N_r)
    # per row and step ([B, Nb]: a row runs at most N steps)
    block_lo: jax.Array  # the step's block, as generation-region indices [lo, hi)
    block_hi: jax.Array
    ratio: jax.Array  # float32 1 - t[i+1] / t[i]
    last: jax.Array  # the block's last step
    active: jax.Array  # the row runs this step
    refresh: jax.Array  # a block starts (the prefix cache is recomputed)
    num_steps: jax.Array  # [] int32


@struct.dataclass
class _Knobs:
    """Runtime options (traced, so changing them does not recompile)."""

    alg: jax.Array  # index into ALGS
    temperature: jax.Array
    top_p: jax.Array
    alg_temp: jax.Array
    cfg: jax.Array
    repeat_penalty: jax.Array
    max_position_penalty: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    top_k: int | None
    with_cfg: bool
    prefix_cache: bool
    record_history: bool


def sample(model: OmniModel, prompts: Sequence[Prompt | Sequence[int] | np.ndarray], *,
           gen_length: int | Sequence[int], steps: int | Sequence[int], alg: str = "entropy",
           temperature: float = 0.0, top_p: float | None = 0.9, top_k: int | None = 50, alg_temp: float = 0.0,
           block_size: int | None = None, cfg: float = 0.0,
           uncond: Sequence[Prompt | Sequence[int] | np.ndarray] | None = None, cfg_compat: bool = False,
           repeat_penalty: float = 1.0, max_position_penalty: float = 1.0, boa_prefill: bool = False,
           prefix_cache: bool = False, seed: int = 0, return_history: bool = False):
    """Generates with the reference's masked-diffusion sampler; returns the generated ids of each row.

    prompts: B prompts, each a `Prompt` or a sequence of token ids (lengths may differ).
    gen_length, steps: N and the step budget, one int for all rows or one per row; a row runs min(steps, N)
        steps per its blocks (S_b = int(len_b / N * min(steps, N)), so a block can get 0 steps and stay masked).
    alg: 'origin', 'maskgit_plus' (confidence = max prob), 'topk_margin' (top1 - top2), 'entropy'
        (confidence = -entropy), or 'entropy-penalty' (entropy with the repeat penalty).
    temperature: > 0 samples x0 from the filtered distribution; 0 takes the argmax.
    top_p: nucleus filter, applied whenever < 1, also at temperature 0 (as the reference does); None = off.
    top_k: keep logits >= the top_k-th (50 is what the reference's config leaves in effect); None = off.
    alg_temp: > 0 draws the committed positions from softmax(confidence / alg_temp) without replacement.
    block_size: semi-autoregressive blocks over the generation region; None (or -1) = one block of N.
    cfg: classifier-free guidance scale; logits = un + (cfg + 1)(cond - un). Needs `uncond`, one prompt per row
        (e.g. the task's empty prompt). By default the unconditional row's generation region is aligned with
        the conditional one; `cfg_compat=True` instead reproduces the reference's speech-to-image behaviour: the
        unconditional row is uncond ++ generation region ++ zero embeddings up to P + N, mixed by absolute
        column (it requires len(uncond) <= P, as the reference does).
    repeat_penalty: for 'entropy-penalty' from the second step on: the logits of ids already generated (other
        than id 0 and the mask) become logit * p if negative, logit / p otherwise.
    max_position_penalty: while more than 100 rows are masked, row r >= 100 (in sequence order) has its
        logits scaled away from 0 by 1 + (r - 100) / (n - 100) * (mpp - 1), raising its entropy.
    boa_prefill: write <|begin_of_audio|> at generated position floor(0.2 N) before decoding (SVQA).
    prefix_cache: reuse the prompt's keys/values within each block (approximate, faster; see prefix_cache.py).
    seed: the PRNG seed (origin's transfers, temperature and alg_temp sampling). Same seed, same output.
    return_history: also return, per row, the generated ids after every step ([steps_run, N]).

    Differences from the reference: rows are independent (the reference pools counts and penalty ids over the
    batch); confidence ties and the position a block that ran out of masks commits go to the lowest position;
    the timesteps follow torch's scalar linspace kernel (the one the reference ran on GPU).

    Returns a list of B int32 arrays [N_r] (leftover masks stay mask ids), and with `return_history` a second
    list of [steps_run_r, N_r] arrays.
    """
    if alg not in ALGS:
        raise ValueError(f"unknown alg {alg!r}: expected one of {ALGS}")
    _check_options(temperature, top_p, top_k, alg_temp, block_size, cfg, repeat_penalty, max_position_penalty)
    prompts = [_as_prompt(p, model, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    gen_length = _per_row(gen_length, len(prompts), "gen_length")
    steps = _per_row(steps, len(prompts), "steps")
    uncond_prompts = None
    if cfg > 0:
        if uncond is None or len(uncond) != len(prompts):
            raise ValueError(f"cfg={cfg} needs `uncond`: one unconditional prompt per row ({len(prompts)})")
        uncond_prompts = [_as_prompt(p, model, f"uncond[{i}]") for i, p in enumerate(uncond)]
    inputs = _plan(model, prompts, uncond_prompts, gen_length, steps, block_size, boa_prefill, cfg_compat)
    static = _Static(top_k, cfg > 0, prefix_cache, return_history)
    knobs = _Knobs(alg=np.int32(ALGS.index(alg)), temperature=np.float32(temperature),
                   top_p=np.float32(1.0 if top_p is None else top_p), alg_temp=np.float32(alg_temp or 0.0),
                   cfg=np.float32(cfg), repeat_penalty=np.float32(repeat_penalty),
                   max_position_penalty=np.float32(max_position_penalty))
    program = _program(model.config, model.mesh, static)
    tokens, history, steps_run = jax.device_get(program(model.params, inputs, knobs, jax.random.key(seed)))
    out = [tokens[b, :n] for b, n in enumerate(gen_length)]
    if not return_history:
        return out
    return out, [history[:steps_run[b], b, :n] for b, n in enumerate(gen_length)]


# ------------------------------------------------------------------------------------------- host-side planning

def _check_options(temperature, top_p, top_k, alg_temp, block_size, cfg, repeat_penalty, max_position_penalty):
    checks = (
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1] or None, got {top_p}"),
        (top_k is None or (isinstance(top_k, int) and top_k >= 1), f"top_k must be an int >= 1 or None, got {top_k}"),
        (alg_temp is None or alg_temp >= 0, f"alg_temp must be >= 0, got {alg_temp}"),
        (block_size is None or block_size == -1 or (isinstance(block_size, int) and block_size >= 1),
         f"block_size must be an int >= 1, or None/-1 for one block, got {block_size}"),
        (cfg >= 0, f"cfg must be >= 0, got {cfg}"),
        (repeat_penalty > 0, f"repeat_penalty must be > 0, got {repeat_penalty}"),
        (max_position_penalty > 0, f"max_position_penalty must be > 0, got {max_position_penalty}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _as_prompt(prompt, model: OmniModel, name: str) -> Prompt:
    """Validates one prompt and returns it as a Prompt with int32 ids (and float32 embeds, int positions)."""
    if not isinstance(prompt, Prompt):
        prompt = Prompt(prompt)
    ids = np.asarray(prompt.ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")
    if (prompt.embeds is None) != (prompt.embed_positions is None):
        raise ValueError(f"{name}: give both embeds and embed_positions, or neither")
    embeds = positions = None
    if prompt.embeds is not None:
        embeds, positions = np.asarray(prompt.embeds, np.float32), np.asarray(prompt.embed_positions)
        hidden = model.config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != hidden or positions.shape != (embeds.shape[0],):
            raise ValueError(f"{name}: embeds must be [T, {hidden}] with embed_positions [T], got "
                             f"{embeds.shape} and {positions.shape}")
        if positions.size and (positions.min() < 0 or positions.max() >= ids.size):
            raise ValueError(f"{name}: embed_positions must lie in the prompt [0, {ids.size}), got "
                             f"[{positions.min()}, {positions.max()}]")
    return Prompt(ids.astype(np.int32), embeds, positions)


def _per_row(value, rows: int, name: str) -> list[int]:
    values = [value] * rows if np.ndim(value) == 0 else list(value)
    if len(values) != rows:
        raise ValueError(f"{name} has {len(values)} entries for {rows} prompts")
    for v in values:
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v}")
    return [int(v) for v in values]


def bucket(n: int, minimum: int = 16) -> int:
    """n rounded up to a compile bucket: a multiple of 2^(bits(n - 1) - 3), so at most 25% (and >= minimum)."""
    if n <= minimum:
        return minimum
    quantum = 1 << max((n - 1).bit_length() - 3, 0)
    return -(-n // quantum) * quantum


def torch_linspace(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num) in float32 as torch's scalar kernels compute it (the CUDA one the reference
    ran): start + step * i for the first half, end - step * (num - 1 - i) for the rest."""
    if num == 1:
        return np.array([start], np.float32)
    start, end = np.float32(start), np.float32(end)
    step = np.float32((end - start) / np.float32(num - 1))
    i = np.arange(num)
    return np.where(i < num // 2, start + step * i.astype(np.float32),
                    end - step * (num - 1 - i).astype(np.float32)).astype(np.float32)


def boa_index(prompt_length: int, gen_length: int) -> int:
    """Where BOA prefill writes <|begin_of_audio|>, as a generation-region index: the reference's
    int(float32(P) + float32(N) * 0.2) - P, that is floor(0.2 N) up to float32 rounding."""
    return int(np.float32(prompt_length) + np.float32(gen_length) * np.float32(0.2)) - prompt_length


def schedule(gen_length: int, steps: int, block_size: int | None, boa_prefill: bool):
    """One row's steps as (block_lo, block_hi, ratio, last) tuples, in generation-region indices.

    Blocks are counted from the masks left after BOA prefill (ceil(masks / block_size)) and cover
    [b * block_size, (b + 1) * block_size) clipped to N; block b runs S_b = int(float32(len_b / N) * S) steps
    with S = min(steps, N), each with ratio = float32(1 - t[i+1] / t[i]) for t = linspace(1, eps, S_b + 1).
    """
    n = gen_length
    total = min(steps, n)
    size = n if block_size is None or block_size < 0 else block_size
    masks = n - (1 if boa_prefill else 0)
    rows = []
    for b in range(-(-masks // size)):
        lo, hi = b * size, min((b + 1) * size, n)
        block_steps = int(np.float32(np.float32(hi - lo) / np.float32(n)) * np.float32(total))
        t = torch_linspace(1.0, EPS, block_steps + 1)
        for i in range(block_steps):
            ratio = np.float32(1.0) - np.float32(t[i + 1] / t[i])
            rows.append((lo, hi, ratio, i == block_steps - 1))
    return rows


def _plan(model: OmniModel, prompts: list[Prompt], uncond: list[Prompt] | None, gen_length: list[int],
          steps: list[int], block_size, boa_prefill: bool, cfg_compat: bool) -> _Inputs:
    """Lays every row out on the bucketed canvas [R, G + Nb] and builds the per-row step tables."""
    b = len(prompts)
    p = [pr.ids.size for pr in prompts]
    pu = [pr.ids.size for pr in uncond] if uncond else []
    limit = model.config.max_position_embeddings
    for r in range(b):
        longest = max(p[r], pu[r] if uncond and not cfg_compat else 0) + gen_length[r]
        if longest > limit:
            raise ValueError(f"row {r}: prompt ({longest - gen_length[r]}) + gen_length ({gen_length[r]}) = "
                             f"{longest} exceeds the model's maximum of {limit} positions")
        if uncond and cfg_compat and pu[r] > p[r]:
            raise ValueError(f"cfg_compat: uncond[{r}] ({pu[r]} tokens) is longer than prompts[{r}] ({p[r]}); the "
                             "reference fails on this shape (use the aligned CFG, cfg_compat=False)")
    g = bucket(max(p + ([] if cfg_compat else pu)))  # column G - 1 holds every row's last prompt token
    nb = bucket(max(gen_length))
    length = g + nb
    rows = b * (2 if uncond else 1)
    hidden = model.config.hidden_size
    num_feats = bucket(max([0] + [pr.embeds.shape[0] for pr in prompts if pr.embeds is not None]))

    prompt_ids = np.zeros((rows, g), np.int32)
    feats = np.zeros((rows, num_feats, hidden), np.float32)
    feat_cols = np.full((rows, num_feats), g, np.int32)
    kind = np.full((rows, length), _ZERO, np.int32)
    src = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    segments = np.ones((rows, length), np.int32)
    cols = np.arange(length)

    def lay_out(row, ids, offset, canvas_at, n, real_len):
        """ids at columns [offset, offset + len(ids)); the generation region (n tokens) from column canvas_at."""
        prompt_ids[row, offset:offset + ids.size] = ids
        kind[row, offset:offset + ids.size] = _PROMPT
        kind[row, canvas_at:canvas_at + n] = _CANVAS
        src[row, canvas_at:canvas_at + n] = np.arange(n)
        segments[row, offset:offset + real_len] = 0
        positions[row] = np.maximum(cols - offset, 0)

    for r, pr in enumerate(prompts):
        n = gen_length[r]
        lay_out(r, pr.ids, g - p[r], g, n, p[r] + n)
        if pr.embeds is not None:
            feats[r, :pr.embeds.shape[0]] = pr.embeds
            feat_cols[r, :pr.embeds.shape[0]] = g - p[r] + pr.embed_positions
        if uncond and cfg_compat:  # uncond ++ generation ++ zeros, from the conditional row's first column
            lay_out(b + r, uncond[r].ids, g - p[r], g - p[r] + pu[r], n, p[r] + n)
        elif uncond:  # aligned: the unconditional generation region is the conditional one
            lay_out(b + r, uncond[r].ids, g - pu[r], g, n, pu[r] + n)

    tokens = np.zeros((b, nb), np.int32)
    plans = []
    for r, n in enumerate(gen_length):
        tokens[r, :n] = model.config.mask_token_id
        if boa_prefill:
            tokens[r, boa_index(p[r], n)] = model.layout.begin_of_audio
        plans.append(schedule(n, steps[r], block_size, boa_prefill))
    num_steps = max(len(s) for s in plans)
    # A row never runs more than N steps (S_b <= len_b), so Nb columns hold any schedule: changing `steps`
    # does not recompile.
    table = {name: np.zeros((b, nb), dtype) for name, dtype in (
        ("block_lo", np.int32), ("block_hi", np.int32), ("ratio", np.float32), ("last", bool), ("active", bool),
        ("refresh", bool))}
    for r, plan in enumerate(plans):
        for j, (lo, hi, ratio, last) in enumerate(plan):
            table["refresh"][r, j] = j == 0 or lo != plan[j - 1][0]
            table["block_lo"][r, j], table["block_hi"][r, j] = lo, hi
            table["ratio"][r, j], table["last"][r, j], table["active"][r, j] = ratio, last, True
    return _Inputs(prompt_ids, feats, feat_cols, kind, src, positions, segments, tokens,
                   num_steps=np.int32(num_steps), **table)


# ------------------------------------------------------------------------------------------- the compiled loop

@functools.lru_cache(maxsize=32)
def _program(cfg: DreamConfig, mesh, static: _Static):
    """The jitted sampler for one model shape, mesh and set of compile-time options."""
    module = Dream(cfg)

    def embed(params, ids):
        return module.apply({"params": params}, ids, method=Dream.embed)

    def lm_head(params, hidden):
        return module.apply({"params": params}, hidden, method=Dream.logits)

    def run(params, inputs: _Inputs, knobs: _Knobs, key):
        with sharding.activate(mesh):
            return loop(params, inputs, knobs, key)

    def loop(params, inputs: _Inputs, knobs: _Knobs, key):
        rows, g = inputs.prompt_ids.shape
        b, nb = inputs.tokens.shape
        length = g + nb
        # prompt-column embeddings, computed once: token embeddings with the given embeddings scattered in
        fixed = embed(params, inputs.prompt_ids)
        fixed = fixed.at[jnp.arange(rows)[:, None], inputs.feat_cols].set(
            inputs.feats.astype(fixed.dtype), mode="drop")
        batch_row = jnp.arange(rows) % b  # model row -> batch row (the unconditional rows follow the batch)
        decide = _decider(cfg, mesh, static.top_k, b)
        count = _candidates(cfg.vocab_size, static.top_k)

        def embeds(tokens, lo):
            """Model input embeddings of columns [lo, L) for every model row."""
            canvas = jnp.take_along_axis(tokens[batch_row], inputs.src[:, lo:], axis=1)
            e = embed(params, canvas) * (inputs.kind[:, lo:, None] == _CANVAS).astype(fixed.dtype)
            from_prompt = inputs.kind[:, lo:g, None] == _PROMPT
            return e.at[:, :g - lo].set(jnp.where(from_prompt, fixed[:, lo:], e[:, :g - lo]))

        def refresh_cache(tokens, cache, rows_refreshing):
            _, (k, v) = run_layers(cfg, params, embeds(tokens, 0), inputs.positions, inputs.segments)
            fresh = (k[:, :, :g - 1], v[:, :, :g - 1])
            keep = rows_refreshing[None, :, None, None, None]
            return jax.tree.map(lambda new, old: jnp.where(keep, new, old), fresh, cache)

        def window_logits(tokens, cache, refresh):
            """Logits [B, Nb, V] of the generation region, shifted: column G + j reads output G + j - 1."""
            if static.prefix_cache:
                c = g - 1
                cache = jax.lax.cond(jnp.any(refresh), lambda kv: refresh_cache(tokens, kv, refresh[batch_row]),
                                     lambda kv: kv, cache)
                hidden, _ = run_layers(cfg, params, embeds(tokens, c), inputs.positions[:, c:],
                                       inputs.segments[:, c:], past=cache, past_segments=inputs.segments[:, :c])
                hidden = hidden[:, :nb]
            else:
                hidden = module.apply({"params": params}, None, inputs_embeds=embeds(tokens, 0),
                                      positions=inputs.positions, segment_ids=inputs.segments, return_hidden=True)
                hidden = hidden[:, g - 1:length - 1]
            logits = sharding.constrain(lm_head(params, hidden),
                                        ("activation_batch", "activation_length", "activation_vocab"))
            if static.with_cfg:
                dtype = logits.dtype
                cond, un = logits[:b].astype(jnp.float32), logits[b:].astype(jnp.float32)
                logits = (un + _round((knobs.cfg + 1) * _round(cond - un, dtype), dtype)).astype(dtype)
            return logits, cache

        def body(state: SamplerState) -> SamplerState:
            j = state.step
            column = lambda table: jax.lax.dynamic_index_in_dim(table, j, axis=1, keepdims=False)  # noqa: E731
            step = _Step(*map(column, (inputs.block_lo, inputs.block_hi, inputs.ratio, inputs.last, inputs.active)))
            logits, cache = window_logits(state.tokens, state.cache, column(inputs.refresh))
            keys = jax.random.split(jax.random.fold_in(key, j), 3)
            noise = _Noise(jax.random.uniform(keys[0], (b, nb)), jax.random.gumbel(keys[1], (b, nb)),
                           jax.random.gumbel(keys[2], (b, nb, count)))
            tokens, ran = decide(logits, state.tokens, step, j, knobs, noise)
            tokens = sharding.constrain(tokens, ("activation_batch", "activation_length"))
            history = state.history
            if static.record_history:
                history = history.at[j].set(tokens)
            return SamplerState(tokens, j + 1, history, state.steps_run + ran, cache)

        cache = None
        if static.prefix_cache:
            shape = (cfg.num_layers, rows, g - 1, cfg.num_kv_heads, cfg.head_dim)
            cache = (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
        t = inputs.block_lo.shape[1] if static.record_history else 0
        state = SamplerState(inputs.tokens, jnp.int32(0), jnp.zeros((t, b, nb), jnp.int32), jnp.zeros(b, jnp.int32),
                             cache)
        state = jax.lax.while_loop(lambda s: s.step < inputs.num_steps, body, state)
        return state.tokens, state.history, state.steps_run

    return jax.jit(run)


@struct.dataclass
class _Step:
    """Each row's schedule entry for the current step, [B] each."""

    block_lo: jax.Array
    block_hi: jax.Array
    ratio: jax.Array
    last: jax.Array
    active: jax.Array


@struct.dataclass
class _Noise:
    """The step's random draws, made for the whole batch so results do not depend on how it is sharded."""

    transfer: jax.Array  # [B, Nb] uniform: origin's per-position transfer draw
    order: jax.Array  # [B, Nb] Gumbel: alg_temp's sampling of positions without replacement
    token: jax.Array  # [B, Nb, K] Gumbel: temperature sampling among the candidates


def _candidates(vocab: int, top_k: int | None) -> int:
    return vocab if top_k is None else min(vocab, top_k + TIE_ROOM)


def _decider(cfg: DreamConfig, mesh, top_k: int | None, batch: int):
    """`_decide` for this model, run per device under a mesh: rows split like the batch, logits split over the
    vocabulary like the lm_head output, so only each row's candidates cross devices."""
    update = functools.partial(_decide, mask_id=cfg.mask_token_id, vocab_size=cfg.vocab_size, top_k=top_k)
    if mesh is None:
        return functools.partial(update, vocab_axes=None)
    rows = sharding.logical_to_spec(("activation_batch",), (batch,), mesh)[0]
    vocab = sharding.logical_to_spec(("activation_vocab",), (cfg.vocab_size,), mesh)[0]
    if vocab is not None and _candidates(cfg.vocab_size, top_k) == cfg.vocab_size:
        vocab = None  # a full sort needs the whole row on one device anyway
    row, row_col = PartitionSpec(rows), PartitionSpec(rows, None)
    in_specs = (PartitionSpec(rows, None, vocab), row_col, _Step(*[row] * 5), PartitionSpec(),
                _Knobs(*[PartitionSpec()] * 7), _Noise(row_col, row_col, PartitionSpec(rows, None, None)))
    return jax.shard_map(functools.partial(update, vocab_axes=vocab), mesh=mesh, in_specs=in_specs,
                         out_specs=(row_col, row), check_vma=False)


def _decide(logits, tokens, step: _Step, j, knobs: _Knobs, noise: _Noise, *, mask_id: int, vocab_size: int,
            top_k: int | None, vocab_axes):
    """One update of every row's generation region from its shifted logits [B, Nb, V] (`generation_utils.py`).

    Returns (tokens [B, Nb], ran [B]: whether the row ran this step). `vocab_axes`: the mesh axes the logits'
    vocabulary is split over (inside shard_map), or None.
    """
    b, nb = tokens.shape
    masked = tokens == mask_id
    column = jnp.arange(nb)
    in_block = (column >= step.block_lo[:, None]) & (column < step.block_hi[:, None])
    is_origin = knobs.alg == ALGS.index("origin")
    # the rows `sample_tokens` sees: every masked position, or origin's transferred ones
    transfer = masked & (noise.transfer < jnp.where(step.last, 1.0, step.ratio)[:, None])
    penalty = jnp.where((knobs.alg == ALGS.index("entropy-penalty")) & (j > 0), knobs.repeat_penalty, 1.0)
    generated = jnp.zeros((b, vocab_size), bool)
    generated = generated.at[jnp.arange(b)[:, None], tokens].set(True).at[:, 0].set(False).at[:, mask_id].set(False)
    x0, confidence = _sample_rows(logits, jnp.where(is_origin, transfer, masked), generated, knobs, penalty, top_k,
                                  noise.token, vocab_axes)

    # how many to commit, and which: top-k of the confidence over masked positions, out-of-block ones at -inf
    m = jnp.sum(masked & in_block, axis=1)
    k = jnp.where(step.last, m, (m.astype(jnp.float32) * step.ratio).astype(jnp.int32))
    ran = step.active & jnp.any(masked, axis=1)
    k = jnp.where(ran, jnp.maximum(k, 1), 0)
    confidence = jnp.where(in_block, confidence, -jnp.inf)
    sampled = confidence / jnp.where(knobs.alg_temp > 0, knobs.alg_temp, 1.0) + noise.order  # Gumbel top-k
    score = jnp.where(knobs.alg_temp > 0, sampled, confidence)
    order = jnp.lexsort((-score, ~masked), axis=1)  # masked first, then by score; ties: the lower column
    rank = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(column[None])
    commit = jnp.where(is_origin, transfer & ran[:, None], masked & (rank < k[:, None]))
    return jnp.where(commit, x0, tokens), ran


def _round(x, dtype):
    """Rounds a float32 intermediate to the logits dtype, where the reference's bf16 math rounds.

    For bfloat16 this is round-to-nearest-even on the bits: a cast pair would be folded away under jit, since XLA
    may keep excess precision."""
    x = x.astype(jnp.float32)
    if dtype != jnp.bfloat16:
        return x.astype(dtype).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _top_k(x, count: int, vocab_axes):
    """`lax.top_k` over the last (vocabulary) axis. When that axis is split over `vocab_axes`, each device takes
    its own top `count` first and only those candidates are gathered. Ties go to the lower id either way."""
    top_k = _chunked_top_k if jax.default_backend() == "gpu" else jax.lax.top_k  # CPU's top_k does not sort
    if vocab_axes is None:
        return top_k(x, count)
    part = x.shape[-1]
    values, ids = top_k(x, min(count, part))
    ids = ids + part * jax.lax.axis_index(vocab_axes)
    values = jax.lax.all_gather(values, vocab_axes, axis=x.ndim - 1, tiled=True)  # shard-major: ids ascend
    ids = jax.lax.all_gather(ids, vocab_axes, axis=x.ndim - 1, tiled=True)
    values, pick = jax.lax.top_k(values, count)
    return values, jnp.take_along_axis(ids, pick, axis=-1)


def _chunked_top_k(x, count: int, chunk: int = TOP_K_CHUNK):
    """`lax.top_k(x, count)` over the last axis, exactly (ties to the lower index), without sorting it whole.

    The `count` largest entries lie in the `count` chunks with the largest maxima: an entry outside them is
    outranked by each of those maxima (larger, or equal and at a lower index). So only those chunks, kept in
    index order, go through `lax.top_k`. GPUs sort for `lax.top_k`: on an H100, 2048 rows of a 176k vocabulary
    take 2.1 ms instead of 25 ms (on CPU, where `lax.top_k` does not sort, this would be 3x slower).
    """
    n = x.shape[-1]
    if n <= 4 * chunk * count:
        return jax.lax.top_k(x, count)
    chunks = -(-n // chunk)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * chunk - n)], constant_values=-jnp.inf)
    padded = padded.reshape(*x.shape[:-1], chunks, chunk)
    _, best = jax.lax.top_k(padded.max(axis=-1), count)  # [..., count] chunk ids
    best = jnp.sort(best, axis=-1)
    values, pick = jax.lax.top_k(jnp.take_along_axis(padded, best[..., None], axis=-2).reshape(*x.shape[:-1], -1),
                                 count)
    return values, jnp.take_along_axis(best, pick // chunk, axis=-1) * chunk + pick % chunk


def _logsumexp(x, vocab_axes):
    """logsumexp over the last axis, reduced across `vocab_axes` when it is split."""
    top = jnp.max(x, axis=-1, keepdims=True)
    if vocab_axes is not None:
        top = jax.lax.pmax(top, vocab_axes)
    total = jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True)
    if vocab_axes is not None:
        total = jax.lax.psum(total, vocab_axes)
    return top + jnp.log(total)


def _sample_rows(logits, rows, generated, knobs: _Knobs, repeat_penalty, top_k: int | None, gumbel, vocab_axes):
    """The reference `sample_tokens` for every column at once: returns x0 and the alg's confidence, both [B, Nb].

    logits [B, Nb, V] (the model dtype: the math rounds to it where the reference does); rows [B, Nb] marks the
    rows the reference passes (their count and order drive the position penalty); generated [B, V] marks the
    ids the repeat penalty applies to; gumbel [B, Nb, K] draws the temperature sample.
    """
    dtype = logits.dtype
    low = jnp.finfo(dtype).min
    temperature = knobs.temperature
    scaled = _round(logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0), dtype)

    # top-p then top-k over the candidates: the reference's filtered row is finfo.min outside them
    count = gumbel.shape[-1]
    values, ids = _top_k(scaled, count, vocab_axes)  # [B, Nb, K], descending
    cumulative = _round(jnp.cumsum(_round(jnp.exp(values - _logsumexp(scaled, vocab_axes)), dtype), axis=-1), dtype)
    before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
    nucleus = (before <= knobs.top_p) | (jnp.arange(count) == 0) | (knobs.top_p >= 1)
    values = jnp.where(nucleus, values, low)
    if top_k is not None and top_k < count:
        values = jnp.where(values < values[..., top_k - 1:top_k], low, values)

    # repeat penalty on generated ids, then the position penalty on late rows
    hit = jnp.take_along_axis(generated[:, None, :], ids, axis=-1)
    away_from_zero = lambda v, m: jnp.where(v < 0, v * m, v / m)  # noqa: E731
    values = jnp.where(hit, _round(away_from_zero(values, repeat_penalty), dtype), values)
    n = jnp.sum(rows, axis=1, keepdims=True)  # [B, 1]
    rank = jnp.cumsum(rows, axis=1) - rows  # [B, Nb] the row's index among the passed rows
    free = POSITION_PENALTY_FREE_ROWS
    ramp = (rank - free).astype(jnp.float32) / jnp.maximum(n - free, 1).astype(jnp.float32)
    scale = jnp.where((n > free) & (rank >= free), ramp * (knobs.max_position_penalty - 1.0) + 1.0, 1.0)
    values = _round(away_from_zero(values, _round(scale, dtype)[..., None]), dtype)

    probs = _round(jax.nn.softmax(values, axis=-1), dtype)
    best = jnp.max(probs, axis=-1)
    greedy = jnp.min(jnp.where(probs == best[..., None], ids, jnp.iinfo(jnp.int32).max), axis=-1)  # ties: lower id
    choice = jnp.argmax(jnp.log(probs) + gumbel, axis=-1)  # a draw from probs
    sampling = temperature > 0
    x0 = jnp.where(sampling, jnp.take_along_axis(ids, choice[..., None], axis=-1)[..., 0], greedy)
    top2 = jax.lax.top_k(probs, 2)[0]
    confidence = jnp.select(
        [knobs.alg == ALGS.index("topk_margin"), knobs.alg >= ALGS.index("entropy")],
        [_round(top2[..., 0] - top2[..., 1], dtype),
         _round(jnp.sum(_round(probs * _round(jnp.log(_round(probs + 1e-10, dtype)), dtype), dtype), axis=-1),
                dtype)],
        jnp.where(sampling, jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0], best))
    return x0, confidence


__all__ = ["ALGS", "Prompt", "SamplerState", "sample", "schedule", "boa_index", "bucket",
           "torch_linspace"]
