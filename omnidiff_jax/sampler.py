"""The masked-diffusion sampler: the reference `_sample` loop (Omni-Diffusion `generation_utils.py`) as one jit.

Per row, as the reference does it for one prompt:

    canvas = prompt ++ [MASK] * N                       (prompt embeddings, speech included, injected each step)
    for each block b (size block_size; one block of N by default), for i < S_b = int(len_b / N * min(steps, N)):
        t = linspace(1, eps, S_b + 1)                   (restarted in every block)
        logits[j] = model(canvas)[j - 1]                (CFG first: un + (cfg_scale + 1)(cond - un); then the shift)
        every masked row: / temperature -> top-p -> top-k -> repeat penalty -> position penalty -> softmax
        x0, confidence per masked row by `alg`; out-of-block rows get confidence -inf
        commit the k most confident rows, k = max(1, int(M (1 - t[i+1] / t[i]))), all M at the last step
        (M: masks left in the block; `origin` instead commits each masked row with probability 1 - t[i+1]/t[i])

`sample` validates the request, plans it on the host (`omnidiff_jax.sampler_plan`: prompts, the step schedule,
compile buckets, the canvas layout) and runs the device loop (`omnidiff_jax.sampler_loop`), which takes the model
as functions built on the model side (`models.dream.decode_functions`). Only the model shape, top_k, CFG on/off,
the cache and history recording are compile-time constants; prompt and generation lengths within a bucket and
every step count reuse one program.

Deliberate differences from the reference, all documented at `sample`:
- batch rows are independent (the reference pools the mask count, the repeat-penalty ids and the position
  ranks over the batch, and uses row 0's block flags);
- ties in the confidence top-k go to the lower position (torch's order is unspecified), which also decides the
  out-of-block position a dry block commits;
- `cfg_compat=False` (the default) aligns the unconditional row's generation region with the conditional one;
  `cfg_compat=True` reproduces the reference's zero-padded, position-misaligned row exactly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from omnidiff_jax.model import OmniModel
from omnidiff_jax.models.dream import decode_functions
from omnidiff_jax.sampler_loop import ALGS, Knobs, SamplerState, Variant, program
from omnidiff_jax.sampler_plan import (MASK_SCHEDULES, Prompt, as_prompt, block_length, boa_index, bucket, make_plan,
                                       schedule, torch_linspace)


def sample(model: OmniModel, prompts: Sequence[Prompt | Sequence[int] | np.ndarray], *,
           gen_length: int | Sequence[int], steps: int | Sequence[int], alg: str = "entropy",
           temperature: float = 0.0, top_p: float | None = 0.9, top_k: int | None = 50, alg_temp: float = 0.0,
           block_size: int | None = None, cfg_scale: float = 0.0,
           uncond: Sequence[Prompt | Sequence[int] | np.ndarray] | None = None, cfg_compat: bool = False,
           repeat_penalty: float = 1.0, max_position_penalty: float = 1.0, boa_prefill: bool = False,
           prefix_cache: bool = False, dual_cache: bool = False, threshold: float | None = None,
           mask_schedule: str = "linear", seed: int = 0, return_history: bool = False):
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
    cfg_scale: classifier-free guidance scale; logits = un + (cfg_scale + 1)(cond - un). Needs `uncond`, one
        prompt per row (e.g. the task's empty prompt). By default the unconditional row's generation region is
        aligned with the conditional one; `cfg_compat=True` instead reproduces the reference's speech-to-image
        behaviour: the unconditional row is uncond ++ generation region ++ zero embeddings up to P + N, mixed by
        absolute column (it requires len(uncond) <= P, as the reference does).
    repeat_penalty: for 'entropy-penalty' from the second step on: the logits of ids already generated (other
        than id 0 and the mask) become logit * p if negative, logit / p otherwise.
    max_position_penalty: while more than 100 rows are masked, row r >= 100 (in sequence order) has its
        logits scaled away from 0 by 1 + (r - 100) / (n - 100) * (mpp - 1), raising its entropy.
    boa_prefill: write <|begin_of_audio|> at generated position floor(0.2 N) before decoding (SVQA).

    Opt-in approximations (faster, not the reference's tokens):
    prefix_cache: reuse the prompt's keys/values within each block, recomputed at every block's start; each step
        runs the model from the last prompt column on (see `models.dream.KVCache`).
    dual_cache: reuse the keys/values of everything outside the current block (prompt and the later blocks),
        recomputed at every block's start; each step runs the model on the block alone (Fast-dLLM's dual cache).
    threshold: confidence-threshold parallel decoding (Fast-dLLM): each step commits every mask of the current
        block whose x0 has probability > threshold, and the most confident one (by `alg`) when none does; a block
        ends when it is full, so `steps` is not used and a row runs at most N steps. Not with 'origin'.
    mask_schedule: 'linear' (the reference's timesteps) or 'cosine': MaskGIT's schedule, the fraction of a
        block still masked after step i of S_b being cos(pi/2 (i + 1) / S_b), for few steps.
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
    _check_options(temperature, top_p, top_k, alg_temp, block_size, cfg_scale, repeat_penalty, max_position_penalty)
    _check_approximations(alg, prefix_cache, dual_cache, threshold, mask_schedule)
    prompts = [as_prompt(p, model.config, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    gen_length = _per_row(gen_length, len(prompts), "gen_length")
    steps = _per_row(steps, len(prompts), "steps")
    uncond_prompts = None
    if cfg_scale > 0:
        if uncond is None or len(uncond) != len(prompts):
            raise ValueError(f"cfg_scale={cfg_scale} needs `uncond`: one unconditional prompt per row "
                             f"({len(prompts)})")
        uncond_prompts = [as_prompt(p, model.config, f"uncond[{i}]") for i, p in enumerate(uncond)]
    plan = make_plan(model.config, model.layout, prompts, uncond_prompts, gen_length, steps, block_size, boa_prefill,
                     cfg_compat, mask_schedule, threshold is not None)
    variant = Variant(mask_id=model.config.mask_token_id, vocab_size=model.config.vocab_size, top_k=top_k,
                      with_cfg=cfg_scale > 0, cache="prefix" if prefix_cache else "dual" if dual_cache else None,
                      block_size=block_length(block_size, plan.tokens.shape[1]) if dual_cache else None,
                      record_history=return_history, threshold=threshold is not None)
    knobs = Knobs(alg=np.int32(ALGS.index(alg)), temperature=np.float32(temperature),
                  top_p=np.float32(1.0 if top_p is None else top_p), alg_temp=np.float32(alg_temp or 0.0),
                  cfg_scale=np.float32(cfg_scale), repeat_penalty=np.float32(repeat_penalty),
                  max_position_penalty=np.float32(max_position_penalty),
                  threshold=np.float32(threshold or 0.0))
    loop = program(decode_functions(model.config), model.mesh, variant)
    tokens, history, steps_run = jax.device_get(loop(model.params, plan, knobs, jax.random.key(seed)))
    out = [tokens[b, :n] for b, n in enumerate(gen_length)]
    if not return_history:
        return out
    return out, [history[:steps_run[b], b, :n] for b, n in enumerate(gen_length)]


def _check_options(temperature, top_p, top_k, alg_temp, block_size, cfg_scale, repeat_penalty,
                   max_position_penalty):
    checks = (
        (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
        (top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1] or None, got {top_p}"),
        (top_k is None or (isinstance(top_k, int) and top_k >= 1), f"top_k must be an int >= 1 or None, got {top_k}"),
        (alg_temp is None or alg_temp >= 0, f"alg_temp must be >= 0, got {alg_temp}"),
        (block_size is None or block_size == -1 or (isinstance(block_size, int) and block_size >= 1),
         f"block_size must be an int >= 1, or None/-1 for one block, got {block_size}"),
        (cfg_scale >= 0, f"cfg_scale must be >= 0, got {cfg_scale}"),
        (repeat_penalty > 0, f"repeat_penalty must be > 0, got {repeat_penalty}"),
        (max_position_penalty > 0, f"max_position_penalty must be > 0, got {max_position_penalty}"),
    )
    _raise_first(checks)


def _check_approximations(alg, prefix_cache, dual_cache, threshold, mask_schedule):
    _raise_first((
        (not (prefix_cache and dual_cache), "prefix_cache and dual_cache exclude each other: pick one"),
        (threshold is None or 0 < threshold < 1, f"threshold must be in (0, 1) or None, got {threshold}"),
        (threshold is None or alg != "origin", "threshold decoding needs a confidence: not with alg 'origin'"),
        (mask_schedule in MASK_SCHEDULES, f"mask_schedule must be one of {MASK_SCHEDULES}, got {mask_schedule!r}"),
    ))


def _raise_first(checks) -> None:
    """Raises ValueError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _per_row(value, rows: int, name: str) -> list[int]:
    values = [value] * rows if np.ndim(value) == 0 else list(value)
    if len(values) != rows:
        raise ValueError(f"{name} has {len(values)} entries for {rows} prompts")
    for v in values:
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v}")
    return [int(v) for v in values]


__all__ = ["ALGS", "MASK_SCHEDULES", "Prompt", "SamplerState", "sample", "schedule", "boa_index", "bucket",
           "torch_linspace"]
