"""One module per network: `dream` (the LLM); the modality front ends live beside it.

`abstract_params` gives any network's parameter shapes without allocating them: checkpoint loaders use them as
the target a key map fills, and the sharding rules read their logical axis names.
"""

import flax.linen as nn
import jax


def abstract_params(module: nn.Module, *inputs) -> dict:
    """ShapeDtypeStructs of `module`'s parameters (nested dict; Flax's logical-axis boxes kept where the network
    declares them), traced from example `inputs` without allocating anything."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
