"""The reference optimizer (Omni-Diffusion `finetune.sh`, `ds_config_zero2.json`): frozen pad row, global-norm clip,
AdamW, and DeepSpeed's WarmupCosineLR with its off-by-one start.

    grads[embed_tokens][<|endoftext|>] = 0          nn.Embedding(padding_idx) never updates that row
    grads *= clip / max(clip, ||grads||)            ZeRO-2 clipping at global L2 norm 1.0
    AdamW(lr(c), b1 0.9, b2 0.95, eps 1e-8, wd 0)   decoupled decay, bias-corrected

    lr(c) = peak * ratio(c - 1) for update c = 0, 1, ... (ratio(-1) = 0: DeepSpeed starts at lr 0 and steps the
            scheduler after each update, so updates 0 and 1 both run at lr 0)
    ratio(j) = ln(j + 1) / ln(W)                                        j < W   (log warmup; W >= 2)
    ratio(j) = max(0, m + (1 - m) (1 + cos(pi (j - W + 1) / (T - W))) / 2)    j >= W  (cosine to m = 0.1)

Gradient accumulation happens in the train step (fp32 accumulators); see trainer.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

EMBED_PATH = ("dream", "embed_tokens", "embedding")


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, cos_min_ratio: float = 0.1,
                  warmup_type: str = "log") -> optax.Schedule:
    """DeepSpeed WarmupCosineLR as an optax schedule of the update count (with the one-update delay)."""
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
    warmup = max(2, warmup_steps)
    if total_steps <= warmup:
        raise ValueError(f"total_steps {total_steps} must exceed the warmup steps {warmup}")

    def schedule(count):
        j = jnp.asarray(count, jnp.float32) - 1.0  # the scheduler's last_batch_iteration when update `count` runs
        if warmup_type == "log":
            warm = jnp.log(jnp.maximum(j, 0.0) + 1.0) / math.log(warmup)
        else:
            warm = j / warmup
        progress = (j - warmup + 1.0) / (total_steps - warmup)
        cosine = jnp.maximum(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0)
        ratio = jnp.where(j < 0, 0.0, jnp.where(j < warmup, warm, cosine))
        return peak_lr * ratio

    return schedule


def zero_row(path: tuple[str, ...], row: int) -> optax.GradientTransformation:
    """Zeroes row `row` of the gradient at `path` (a frozen embedding row)."""

    def update(updates, state, params=None):
        del params
        return _replace(updates, path, lambda g: g.at[row].set(0)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _replace(tree: dict, path: tuple[str, ...], fn) -> dict:
    if not path:
        return fn(tree)
    if path[0] not in tree:
        raise ValueError(f"no parameter {'/'.join(path)} to freeze; have {sorted(tree)}")
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], fn)}


def make_optimizer(cfg: ml_collections.ConfigDict, pad_id: int) -> tuple[optax.GradientTransformation,
                                                                           optax.Schedule]:
    """(optimizer, lr schedule) from the `optim` config section (warmup = ceil(warmup_ratio x total_steps))."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.total_steps)  # HF's get_warmup_steps
    schedule = warmup_cosine(cfg.lr, warmup, cfg.total_steps, cfg.cos_min_ratio, cfg.warmup_type)
    parts = [zero_row(EMBED_PATH, pad_id)] if cfg.freeze_pad_row else []
    parts += [optax.clip_by_global_norm(cfg.clip),
              optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)]
    return optax.chain(*parts), schedule


def frozen_norm(grads, pad_id: int, freeze_pad_row: bool) -> jax.Array:
    """Global L2 norm of the gradients the clip sees (after freezing the pad row)."""
    if freeze_pad_row:
        grads = _replace(grads, EMBED_PATH, lambda g: g.at[pad_id].set(0))
    return optax.tree.norm(grads)
