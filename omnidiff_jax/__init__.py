"""omnidiff_jax: a JAX/Flax reimplementation of Omni-Diffusion (any-to-any masked discrete diffusion).

Public entry points: `load_model`, `init_model`, `OmniModel`, `TokenLayout`, `get_config`.
"""

from omnidiff_jax.config import get_config
from omnidiff_jax.model import OmniModel, init_model, load_model
from omnidiff_jax.vocab import TokenLayout

__all__ = ["OmniModel", "TokenLayout", "get_config", "init_model", "load_model"]
