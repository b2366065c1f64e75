"""Where a training run's first weights come from (the `init` config section).

    random       fresh weights (tests, demos)
    dream        a Hugging Face Dream folder with a smaller vocabulary (Dream-v0-Base-7B: 152064 rows), the
                 embedding and the untied lm_head grown to the config's vocabulary as transformers'
                 `resize_token_embeddings(pad_to_multiple_of=8, mean_resizing=False)` does: old rows kept, new
                 rows ~ N(0, 0.02) (stage 1)
    omni         a reference Omni-Diffusion folder, loaded as is (the shipped fine-tune recipe)
    checkpoint   the latest parameters of another training run's folder (stages 2 and 3)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from omnidiff_jax.checkpoint import load_dream_params, load_model
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.model import param_shardings
from omnidiff_jax.models.dream import Dream, DreamConfig, stack_layers
from omnidiff_jax.train.checkpoints import load_run_params

INIT_KINDS = ("random", "dream", "omni", "checkpoint")


def resize_vocab(params: dict, vocab_size: int, key: jax.Array, std: float = 0.02,
                 pad_to_multiple_of: int = 8) -> dict:
    """Grows `embed_tokens/embedding` and `lm_head/embedding` (both [V, H]) to `vocab_size` rows (rounded up to
    `pad_to_multiple_of`): existing rows are kept, new ones drawn from N(0, std) in float32."""
    old, hidden = params["embed_tokens"]["embedding"].shape
    new = math.ceil(vocab_size / pad_to_multiple_of) * pad_to_multiple_of
    if new < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {new} rows")

    def grow(table: jax.Array, key: jax.Array) -> jax.Array:
        rows = std * jax.random.normal(key, (new - old, hidden), jnp.float32)
        return jnp.concatenate([table, rows.astype(table.dtype)])

    k_embed, k_head = jax.random.split(key)
    return {**params, "embed_tokens": {"embedding": grow(params["embed_tokens"]["embedding"], k_embed)},
            "lm_head": {"embedding": grow(params["lm_head"]["embedding"], k_head)}}


def load_dream_resized(path: str | Path, cfg: DreamConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    """A Hugging Face Dream folder whose shape matches `cfg` except for a smaller vocabulary, resized to it
    (float32; with a mesh, read and resized straight into `cfg`'s sharded layout)."""
    params = load_dream_params(path, cfg, mesh)
    resize = functools.partial(resize_vocab, vocab_size=cfg.vocab_size)
    return jax.jit(resize, out_shardings=None if mesh is None else param_shardings(cfg, mesh))(params, key=key)


def initial_params(cfg: ml_collections.ConfigDict, model_cfg: DreamConfig, mesh: Mesh | None = None) -> dict:
    """The trainable parameter trees ({"dream": ...}, plus "audio_projection" when the source has a trained
    projector) a run starts from, per `cfg.init` (kind, path, seed); laid out on `mesh` when given."""
    kind, key = cfg.init.kind, jax.random.key(cfg.init.seed)
    if kind not in INIT_KINDS:
        raise ValueError(f"init.kind must be one of {INIT_KINDS}, got {kind!r}")
    if kind == "random":
        ids = jnp.zeros((1, 8), jnp.int32)
        init = jax.jit(lambda k: nn.meta.unbox(Dream(model_cfg).init(k, ids)["params"]),
                       out_shardings=None if mesh is None else param_shardings(model_cfg, mesh))
        return {"dream": init(key)}
    if kind == "dream":
        return {"dream": load_dream_resized(cfg.init.path, model_cfg, key, mesh)}
    if kind == "omni":
        model = load_model(cfg.init.path, dtype=model_cfg.param_dtype, mesh=mesh)
        if model.config.replace(dtype=model_cfg.dtype, remat_policy=model_cfg.remat_policy,
                                attention_impl=model_cfg.attention_impl) != model_cfg:
            raise CheckpointError(f"{cfg.init.path}: model {model.config} does not match the training config")
        stack = jax.jit(stack_layers, out_shardings=None if mesh is None else param_shardings(model_cfg, mesh))
        params = {"dream": stack(model.params)}
        if model.speech is not None:
            params["audio_projection"] = model.speech.params["projector"]
        return params
    shardings = None if mesh is None else {"dream": param_shardings(model_cfg, mesh)}
    return load_run_params(cfg.init.path, shardings=shardings)
