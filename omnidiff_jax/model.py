"""The loaded model a user holds: config, token layout, parameters, and jitted entry points.

`init_model(config)` builds random weights from a built-in config; `omnidiff_jax.checkpoint.load_model(path)`
reads a checkpoint into an `OmniModel`. `OmniModel.logits` is the reference forward:
`DreamModel.forward` semantics (packed segments from position ids, padded query rows output 0) when position ids
or an attention mask are given, `forward_dream` semantics (full attention, positions 0..L-1) otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from omnidiff_jax import sharding
from omnidiff_jax.attention import segment_ids_from_positions
from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.models import abstract_params
from omnidiff_jax.models.dream import Dream, DreamConfig, decode_functions, unstack_layers
from omnidiff_jax.vocab import TokenLayout


@dataclasses.dataclass
class OmniModel:
    """A Dream model with its parameters, laid out for inference.

    `params` is a plain nested dict of arrays (no Flax boxes) whose `layers` entry is a tuple of per-layer trees
    (`models.dream.unstack_layers`); parameters in the training layout (stacked layers) are split on construction.
    """

    config: DreamConfig
    layout: TokenLayout
    params: dict
    mesh: Mesh | None = None
    tokenizer_path: str | None = None  # folder with the checkpoint's tokenizer files, if any
    speech: Any = None  # `speech_in.SpeechInput` (SenseVoice encoder + projector) when the checkpoint has one

    def __post_init__(self):
        self.params = unstack_layers(self.params)

    @functools.cached_property
    def _forward(self):
        model, mesh = decode_functions(self.config), self.mesh

        def forward(params, input_ids, inputs_embeds, positions, segment_ids, query_valid):
            with sharding.activate(mesh):
                embeds = model.embed(params, input_ids) if inputs_embeds is None else inputs_embeds
                logits = model.logits(params, model.hidden(params, embeds, positions, segment_ids, query_valid))
            return logits.astype(jnp.float32)

        return jax.jit(forward)

    def logits(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None) -> jax.Array:
        """float32 logits [B, L, V], unshifted (output i-1 predicts token i, as in the reference).

        input_ids [B, L] int, or inputs_embeds [B, L, H]; position_ids [B, L] (a 0 starts a packed segment);
        attention_mask [B, L] (0 = padded query row, whose output is 0).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            input_ids = check_ids(input_ids, self.config.vocab_size, "input_ids")
            shape = input_ids.shape
        else:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [B, L, {self.config.hidden_size}], "
                                 f"got shape {inputs_embeds.shape}")
            shape = inputs_embeds.shape[:2]
        positions = segment_ids = query_valid = None
        if position_ids is not None:
            positions = jnp.asarray(_check_shape(position_ids, shape, "position_ids"), jnp.int32)
            segment_ids = segment_ids_from_positions(positions)
        if attention_mask is not None:
            query_valid = jnp.asarray(_check_shape(attention_mask, shape, "attention_mask")) != 0
            if segment_ids is None:
                segment_ids = jnp.zeros(shape, jnp.int32)
        return self._forward(self.params, input_ids, inputs_embeds, positions, segment_ids, query_valid)

    def embed(self, input_ids) -> jax.Array:
        """Token embeddings [B, L, H] in the compute dtype."""
        ids = check_ids(input_ids, self.config.vocab_size, "input_ids")
        return decode_functions(self.config).embed(self.params, ids)


def check_ids(ids, vocab_size: int, name: str) -> jax.Array:
    """Validates a [B, L] integer id array (values checked when concrete)."""
    arr = np.asarray(ids) if not isinstance(ids, jax.core.Tracer) else ids
    if arr.ndim != 2:
        raise ValueError(f"{name} must have rank 2 [batch, length], got shape {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if isinstance(arr, np.ndarray) and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return jnp.asarray(arr, jnp.int32)


def _check_shape(x, shape, name):
    arr = np.asarray(x)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} to match the inputs, got {tuple(arr.shape)}")
    return arr


def abstract_dream(cfg: DreamConfig) -> dict:
    """Dream's parameters for `cfg` (training layout) as ShapeDtypeStructs in Flax's logical-axis boxes,
    allocating nothing."""
    return abstract_params(Dream(cfg), jnp.zeros((1, 8), jnp.int32))


def param_shardings(cfg: DreamConfig, mesh: Mesh) -> dict:
    """NamedSharding per parameter (a plain nested dict, training layout) for `cfg` on `mesh`."""
    return sharding.param_shardings(abstract_dream(cfg), mesh)


def init_model(config: str = "tiny", seed: int = 0, mesh: Mesh | None = None, **overrides) -> OmniModel:
    """Random weights for a built-in config name (or config path); `overrides` replace DreamConfig fields."""
    cfg_dict = get_config(config)
    cfg = dream_config(cfg_dict).replace(**overrides)
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda key: nn.meta.unbox(Dream(cfg).init(key, ids)["params"])  # noqa: E731
    if mesh is not None:
        init = jax.jit(init, out_shardings=param_shardings(cfg, mesh))
    return OmniModel(cfg, token_layout(cfg_dict), unstack_layers(init(jax.random.key(seed)), consume=True), mesh)


__all__ = ["OmniModel", "init_model", "check_ids", "abstract_dream", "param_shardings"]
