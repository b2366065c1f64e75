"""Host-side planning for the sampler: prompts, the step schedule, compile buckets and the canvas layout.

Everything here runs in NumPy before the device loop (`omnidiff_jax.sampler_loop`) starts, with the reference's
float32 arithmetic (Omni-Diffusion `generation_utils.py`, `_sample`):

    canvas   = prompt ++ [MASK] * N                     (left-padded so every row's generation region starts at G)
    blocks   = ceil(masks / block_size) blocks of [b * block_size, (b + 1) * block_size), clipped to N
    S_b      = int(len_b / N * min(steps, N))            steps of block b
    ratio_i  = 1 - t[i+1] / t[i],  t = linspace(1, eps, S_b + 1)   (restarted in every block)

(`mask_schedule='cosine'`: MaskGIT's t_i = cos(pi/2 i / S_b) instead; with a confidence threshold the blocks are
not scheduled at all: the device loop moves on when a block is full.)

Lengths are rounded up to buckets (at most 25% over), so prompts and generation lengths within a bucket reuse one
compiled program; the step tables have one column per generated token (a row never runs more steps than that),
so the step count never recompiles either. Padding sits in its own attention segment, so a row's logits do not
depend on its neighbours.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from flax import struct

from omnidiff_jax.models.dream import DreamConfig
from omnidiff_jax.vocab import TokenLayout

EPS = 1e-3  # the final timestep, DreamGenerationConfig's default
MASK_SCHEDULES = ("linear", "cosine")

# What fills a canvas column of a model row.
PROMPT, CANVAS, ZERO = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: token ids [P], and optionally embeddings [T, hidden] that overwrite the token embeddings at
    `embed_positions` [T] (speech features on their `<|context_of_audio|>` placeholders, as Dream's forward)."""

    ids: Sequence[int] | np.ndarray
    embeds: np.ndarray | None = None
    embed_positions: Sequence[int] | np.ndarray | None = None


@struct.dataclass
class Plan:
    """Everything the device loop reads, as arrays: R model rows (B, or 2B with CFG: the unconditional rows
    follow the batch) on a canvas of L = G + Nb columns, and each batch row's step table."""

    prompt_ids: np.ndarray  # [R, G] ids of the prompt columns
    feats: np.ndarray  # [R, F, hidden] embeddings overwriting prompt columns
    feat_cols: np.ndarray  # [R, F] their columns (G = none)
    kind: np.ndarray  # [R, L] PROMPT / CANVAS / ZERO
    src: np.ndarray  # [R, L] generation-region index a CANVAS column reads
    positions: np.ndarray  # [R, L] RoPE positions
    segments: np.ndarray  # [R, L] 0 = the row's real sequence, 1 = padding
    tokens: np.ndarray  # [B, Nb] the initial generation regions (mask, BOA prefill, 0 beyond N_r)
    gen_length: np.ndarray  # [B] N_r
    block_size: np.ndarray  # [B] the row's block size (N_r for one block)
    # per row and step ([B, Nb]: a row runs at most N steps)
    block_lo: np.ndarray  # the step's block, as generation-region indices [lo, hi)
    block_hi: np.ndarray
    ratio: np.ndarray  # float32 1 - t[i+1] / t[i]
    last: np.ndarray  # the block's last step
    active: np.ndarray  # the row may run this step
    num_steps: np.ndarray  # [] int32


def as_prompt(prompt, config: DreamConfig, name: str) -> Prompt:
    """Validates one prompt (a `Prompt` or token ids) and returns it with int32 ids (and float32 embeds)."""
    if not isinstance(prompt, Prompt):
        prompt = Prompt(prompt)
    ids = np.asarray(prompt.ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    vocab = config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")
    if (prompt.embeds is None) != (prompt.embed_positions is None):
        raise ValueError(f"{name}: give both embeds and embed_positions, or neither")
    embeds = positions = None
    if prompt.embeds is not None:
        embeds, positions = np.asarray(prompt.embeds, np.float32), np.asarray(prompt.embed_positions)
        hidden = config.hidden_size
        if embeds.ndim != 2 or embeds.shape[1] != hidden or positions.shape != (embeds.shape[0],):
            raise ValueError(f"{name}: embeds must be [T, {hidden}] with embed_positions [T], got "
                             f"{embeds.shape} and {positions.shape}")
        if positions.size and (positions.min() < 0 or positions.max() >= ids.size):
            raise ValueError(f"{name}: embed_positions must lie in the prompt [0, {ids.size}), got "
                             f"[{positions.min()}, {positions.max()}]")
    return Prompt(ids.astype(np.int32), embeds, positions)


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


def block_length(block_size: int | None, gen_length: int) -> int:
    """The block size a `block_size` option means for N = gen_length tokens: N for one block (None or < 0)."""
    return gen_length if block_size is None or block_size < 0 else block_size


def schedule(gen_length: int, steps: int, block_size: int | None, boa_prefill: bool, mask_schedule: str = "linear"):
    """One row's steps as (block_lo, block_hi, ratio, last) tuples, in generation-region indices.

    Blocks are counted from the masks left after BOA prefill (ceil(masks / block_size)) and cover
    [b * block_size, (b + 1) * block_size) clipped to N; block b runs S_b = int(float32(len_b / N) * S) steps
    with S = min(steps, N), each with ratio = float32(1 - t[i+1] / t[i]) for t = linspace(1, eps, S_b + 1), or
    with `mask_schedule='cosine'` t_i = cos(pi/2 i / S_b) (MaskGIT: the fraction still masked after step i).
    """
    n = gen_length
    total = min(steps, n)
    size = block_length(block_size, n)
    masks = n - (1 if boa_prefill else 0)
    rows = []
    for b in range(-(-masks // size)):
        lo, hi = b * size, min((b + 1) * size, n)
        block_steps = int(np.float32(np.float32(hi - lo) / np.float32(n)) * np.float32(total))
        if mask_schedule == "cosine":
            i = np.arange(block_steps + 1, dtype=np.float32)
            t = np.cos(np.float32(math.pi / 2) * i / np.float32(max(block_steps, 1)))
        else:
            t = torch_linspace(1.0, EPS, block_steps + 1)
        for i in range(block_steps):
            ratio = np.float32(1.0) - np.float32(t[i + 1] / t[i])
            rows.append((lo, hi, ratio, i == block_steps - 1))
    return rows


def check_lengths(config: DreamConfig, prompts: list[Prompt], uncond: list[Prompt] | None, gen_length: list[int],
                  cfg_compat: bool) -> None:
    """Raises a ValueError naming the row when a canvas does not fit the model or the CFG layout."""
    limit = config.max_position_embeddings
    for r, (prompt, n) in enumerate(zip(prompts, gen_length)):
        p = prompt.ids.size
        pu = uncond[r].ids.size if uncond else 0
        longest = max(p, 0 if cfg_compat else pu) + n
        if longest > limit:
            raise ValueError(f"row {r}: prompt ({longest - n}) + gen_length ({n}) = {longest} exceeds the "
                             f"model's maximum of {limit} positions")
        if uncond and cfg_compat and pu > p:
            raise ValueError(f"cfg_compat: uncond[{r}] ({pu} tokens) is longer than prompts[{r}] ({p}); the "
                             "reference fails on this shape (use the aligned CFG, cfg_compat=False)")


def make_plan(config: DreamConfig, layout: TokenLayout, prompts: list[Prompt], uncond: list[Prompt] | None,
              gen_length: list[int], steps: list[int], block_size: int | None, boa_prefill: bool,
              cfg_compat: bool, mask_schedule: str = "linear", threshold: bool = False) -> Plan:
    """Lays every row out on the bucketed canvas [R, G + Nb] and builds the per-row step tables (with a
    confidence `threshold` a row may run up to N_r steps; the loop finds its blocks itself).

    Column G - 1 holds every row's last prompt token. With CFG the unconditional row b + B is, aligned
    (`cfg_compat=False`): uncond ++ the generation region, ending where the conditional prompt ends; or as the
    reference builds it (`cfg_compat=True`): uncond ++ generation region ++ zero embeddings, from the conditional
    row's first column, so the two rows are mixed by absolute column.
    """
    check_lengths(config, prompts, uncond, gen_length, cfg_compat)
    b = len(prompts)
    p = [pr.ids.size for pr in prompts]
    pu = [pr.ids.size for pr in uncond] if uncond else []
    g = bucket(max(p + ([] if cfg_compat else pu)))
    nb = bucket(max(gen_length))
    canvas = _Canvas(rows=b * (2 if uncond else 1), g=g, nb=nb, hidden=config.hidden_size,
                     num_feats=bucket(max([0] + [pr.embeds.shape[0] for pr in prompts if pr.embeds is not None])))
    for r, pr in enumerate(prompts):
        n = gen_length[r]
        canvas.lay_out(r, pr.ids, g - p[r], g, n, p[r] + n)
        if pr.embeds is not None:
            canvas.feats[r, :pr.embeds.shape[0]] = pr.embeds
            canvas.feat_cols[r, :pr.embeds.shape[0]] = g - p[r] + pr.embed_positions
        if uncond and cfg_compat:  # uncond ++ generation ++ zeros, from the conditional row's first column
            canvas.lay_out(b + r, uncond[r].ids, g - p[r], g - p[r] + pu[r], n, p[r] + n)
        elif uncond:  # aligned: the unconditional generation region is the conditional one
            canvas.lay_out(b + r, uncond[r].ids, g - pu[r], g, n, pu[r] + n)

    tokens = np.zeros((b, nb), np.int32)
    for r, n in enumerate(gen_length):
        tokens[r, :n] = config.mask_token_id
        if boa_prefill:
            tokens[r, boa_index(p[r], n)] = layout.begin_of_audio
    if threshold:  # at least one commit per step
        plans = [[(0, 0, np.float32(0), False)] * n for n in gen_length]
    else:
        plans = [schedule(n, s, block_size, boa_prefill, mask_schedule) for n, s in zip(gen_length, steps)]
    sizes = [min(block_length(block_size, n), n) for n in gen_length]
    return Plan(canvas.prompt_ids, canvas.feats, canvas.feat_cols, canvas.kind, canvas.src, canvas.positions,
                canvas.segments, tokens, np.asarray(gen_length, np.int32), np.asarray(sizes, np.int32),
                **_step_tables(plans, nb))


class _Canvas:
    """The canvas arrays of `Plan` being filled in, row by row."""

    def __init__(self, rows: int, g: int, nb: int, hidden: int, num_feats: int):
        length = g + nb
        self.prompt_ids = np.zeros((rows, g), np.int32)
        self.feats = np.zeros((rows, num_feats, hidden), np.float32)
        self.feat_cols = np.full((rows, num_feats), g, np.int32)
        self.kind = np.full((rows, length), ZERO, np.int32)
        self.src = np.zeros((rows, length), np.int32)
        self.positions = np.zeros((rows, length), np.int32)
        self.segments = np.ones((rows, length), np.int32)

    def lay_out(self, row: int, ids: np.ndarray, offset: int, canvas_at: int, n: int, real_len: int) -> None:
        """ids at columns [offset, offset + len(ids)); the generation region (n tokens) from column canvas_at;
        the row's real sequence (segment 0) is [offset, offset + real_len), positions count from offset."""
        self.prompt_ids[row, offset:offset + ids.size] = ids
        self.kind[row, offset:offset + ids.size] = PROMPT
        self.kind[row, canvas_at:canvas_at + n] = CANVAS
        self.src[row, canvas_at:canvas_at + n] = np.arange(n)
        self.segments[row, offset:offset + real_len] = 0
        self.positions[row] = np.maximum(np.arange(self.kind.shape[1]) - offset, 0)


def _step_tables(plans: list[list[tuple]], nb: int) -> dict:
    """The per-row schedules as [B, Nb] tables (a row never runs more than N <= Nb steps, since S_b <= len_b),
    plus the number of steps the loop runs."""
    b = len(plans)
    table = {name: np.zeros((b, nb), dtype) for name, dtype in (
        ("block_lo", np.int32), ("block_hi", np.int32), ("ratio", np.float32), ("last", bool), ("active", bool))}
    for r, plan in enumerate(plans):
        for j, (lo, hi, ratio, last) in enumerate(plan):
            table["block_lo"][r, j], table["block_hi"][r, j] = lo, hi
            table["ratio"][r, j], table["last"][r, j], table["active"][r, j] = ratio, last, True
    table["num_steps"] = np.int32(max(len(plan) for plan in plans))
    return table
