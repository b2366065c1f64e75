"""omnidiff_jax: a JAX/Flax reimplementation of Omni-Diffusion (any-to-any masked discrete diffusion).

Public entry points: `load_model`, `init_model`, `OmniModel`, `sample`, `Prompt`, `TokenLayout`, `get_config`;
`omnidiff_jax.pipeline.Pipeline` runs the six tasks.
"""

from omnidiff_jax.checkpoint import load_model
from omnidiff_jax.config import get_config
from omnidiff_jax.model import OmniModel, init_model
from omnidiff_jax.sampler import Prompt, sample
from omnidiff_jax.vocab import TokenLayout

__all__ = ["OmniModel", "Prompt", "TokenLayout", "get_config", "init_model", "load_model", "sample"]
