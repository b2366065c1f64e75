"""The audio projector (`ResamplerProjector(512, 3584)`): SenseVoice encodings -> LLM embedding width, in Flax.

Omni-Diffusion `resampler_projector.py`. Despite the reference's name it does no resampling, only

    y = linear_2(gelu_erf(linear_1(layer_norm(x))))      512 -> 3584 -> 3584, both Linears without bias

LayerNorm (eps 1e-5, affine) runs in fp32 and casts back; the GELU is the exact erf form, evaluated in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from omnidiff_jax.models.layers import Dense
from omnidiff_jax.models.sensevoice import LayerNorm


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Widths and numerics. `omni_diffusion()` is the released model's 512 -> 3584 projector."""

    input_size: int = 512  # the encoder's output_size
    hidden_size: int = 3584  # the LLM's hidden_size
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"

    @classmethod
    def omni_diffusion(cls, **changes: Any) -> "ProjectorConfig":
        return cls(**changes)

    @classmethod
    def tiny(cls, **changes: Any) -> "ProjectorConfig":
        """Matches `SenseVoiceConfig.tiny()` (32 wide) and the tiny Dream (64 wide)."""
        return cls(**{**dict(input_size=32, hidden_size=64, dtype="float32", param_dtype="float32"), **changes})

    def replace(self, **changes: Any) -> "ProjectorConfig":
        return dataclasses.replace(self, **changes)


class Projector(nn.Module):
    """x [..., input_size] -> [..., hidden_size] in the compute dtype."""

    config: ProjectorConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(Dense, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  kernel_init=nn.initializers.normal(0.02))
        h = dense(cfg.hidden_size, name="linear_1")(LayerNorm(cfg.param_dtype, name="pre_proj_layernorm")(x))
        h = nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)
        return dense(cfg.hidden_size, name="linear_2")(h)


def init_params(config: ProjectorConfig, seed: int = 0) -> dict:
    """Random parameters (Linear N(0, 0.02), LayerNorm 1 / 0 like the reference's init) for `config`."""
    return Projector(config).init(jax.random.key(seed), jnp.zeros((1, config.input_size)))["params"]


__all__ = ["ProjectorConfig", "Projector", "init_params"]
