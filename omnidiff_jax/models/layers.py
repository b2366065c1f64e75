"""Layers shared by the networks: a linear layer that rounds the way PyTorch's `nn.Linear` does, and a cast that
stays a rounding in XLA's fused code.

Flax's `nn.Dense` with a bf16 compute dtype rounds the matmul to bf16 and rounds again after adding the bias.
PyTorch's bf16 `nn.Linear` accumulates in float32, adds the bias in float32 and rounds once, so about a third of
each biased layer's outputs would land one bf16 ulp apart, and over many layers the two drift as far apart as
bf16 is from float32. `Dense` here computes the reference's way; in float32 it computes what `nn.DenseGeneral`
computes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _drawn_flat(init: Callable, flat_shape: tuple[int, ...]) -> Callable:
    """An initializer that draws `flat_shape` and reshapes it, as `nn.DenseGeneral` draws its parameters."""

    def wrapped(rng, shape, dtype):
        value = init(rng, flat_shape, dtype)
        if isinstance(value, nn.meta.AxisMetadata):  # logical-axis metadata names the final shape's axes
            return nn.meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return wrapped


class Dense(nn.Module):
    """y = x·W + b over the input axes `axis`, rounded once to `dtype` (PyTorch's `nn.Linear` numerics).

    features: an int or a tuple (the output's trailing shape). Parameters are `kernel` [*contracted, *features]
    and `bias` [*features] in `param_dtype`: the names, shapes and initial draws of `nn.Dense` /
    `nn.DenseGeneral`, so checkpoints and key maps do not change. The matmul accumulates in float32
    (`preferred_element_type`), the bias is added in float32, and the sum is cast to `dtype` once.
    Output: x's other axes in order, then `features`.
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = tuple(a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis))
        contracted = tuple(x.shape[a] for a in axis)
        flat = (int(np.prod(contracted)), int(np.prod(features)))
        kernel = self.param("kernel", _drawn_flat(self.kernel_init, flat), contracted + features, self.param_dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((axis, tuple(range(len(axis)))), ((), ())), precision=self.precision,
                                preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param("bias", _drawn_flat(self.bias_init, flat[1:]), features, self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def round_to(x: jax.Array, dtype) -> jax.Array:
    """x cast to `dtype` and rounded there even inside an XLA fusion, as PyTorch rounds each op's output.

    XLA's default compile may keep a bf16 result in float32 across fused ops (`xla_allow_excess_precision`): it
    drops a cast to bf16 followed by a cast back, so the next op sees the unrounded value where PyTorch's sees the
    bf16 tensor. For bfloat16, x is rounded in float32 by `lax.reduce_precision` first, which XLA keeps; any other
    dtype is a plain cast (float32 is unaffected; float16's subnormals would be flushed by reduce_precision).
    """
    if jnp.dtype(dtype) == jnp.bfloat16:
        x = jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)
    return x.astype(dtype)


__all__ = ["Dense", "round_to"]
