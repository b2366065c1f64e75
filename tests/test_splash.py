"""The TPU splash-attention path, checked without a TPU: the Pallas kernel runs in interpret mode on CPU, per shard
inside `shard_map` over the 8 fake devices (as MaxText runs it), against the XLA attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnidiff_jax import attention, sharding
from omnidiff_jax.attention import dot_product_attention, segment_ids_from_positions


def inputs(b, l, hq, hkv, d, lengths, valid_len):
    """Random q/k/v, packed segments of `lengths` per row (position ids restart at 0), the last `l - valid_len`
    query rows padding."""
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (b, l, hq, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, l, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, l, hkv, d), jnp.float32)
    positions = np.concatenate([np.arange(n) for n in lengths])
    positions = np.stack([np.roll(positions, 3 * row) for row in range(b)])  # different packing per row
    segments = segment_ids_from_positions(jnp.asarray(positions))
    valid = jnp.asarray(np.broadcast_to(np.arange(l) < valid_len, (b, l)))
    return q, k, v, segments, valid


@pytest.mark.parametrize("mesh_shape", [None, dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, tensor=4)])
def test_splash_matches_xla(mesh_shape):
    """Bidirectional, packed segments, padded query rows, grouped kv heads (4 query heads on 2 kv heads), a length
    that is not a multiple of 128; the tensor=4 mesh splits the query heads but not the kv heads, so neither is
    split inside the kernel."""
    q, k, v, segments, valid = inputs(b=4, l=200, hq=4, hkv=2, d=16, lengths=(90, 60, 50), valid_len=180)
    mesh = None if mesh_shape is None else sharding.make_mesh(**mesh_shape)

    def attend(q, k, v, segments, valid, implementation):
        with sharding.activate(mesh):
            return dot_product_attention(q, k, v, segment_ids=segments, query_valid=valid,
                                         implementation=implementation)

    splash = jax.jit(attend, static_argnums=5)(q, k, v, segments, valid, "splash")
    xla = jax.jit(attend, static_argnums=5)(q, k, v, segments, valid, "xla")
    np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(splash)[:, 180:] == 0)


def test_splash_gradients_match_xla():
    """The kernel's backward pass (what training on TPU runs), under the data x fsdp x tensor mesh."""
    q, k, v, segments, valid = inputs(b=2, l=128, hq=4, hkv=2, d=16, lengths=(70, 58), valid_len=120)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    weights = jax.random.normal(jax.random.key(3), q.shape)

    def loss(q, k, v, implementation):
        with sharding.activate(mesh):
            out = dot_product_attention(q, k, v, segment_ids=segments, query_valid=valid,
                                        implementation=implementation)
        return jnp.sum(out * weights)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for got, want in zip(grad(q, k, v, "splash"), grad(q, k, v, "xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_auto_picks_splash_only_on_tpu(monkeypatch):
    for backend, want in (("tpu", "splash"), ("cpu", "xla"), ("gpu", "cudnn")):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert attention.auto_implementation(jnp.bfloat16) == want
