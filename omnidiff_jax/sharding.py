"""Device meshes and the one table that maps logical axis names to mesh axes.

Modeling code names logical axes only (`embed`, `mlp`, `vocab`, `activation_batch`, ...). `LOGICAL_RULES` maps
them onto the mesh axes `data`, `fsdp` and `tensor`, so data parallelism, FSDP and tensor parallelism are chosen
by the mesh shape alone. A mesh axis that does not divide an array dimension is dropped for that array (and
logged once) instead of failing, so a checkpoint loads on any mesh: on an 8-way tensor axis Dream-7B's 28 query
heads and 4 kv heads stay replicated while its MLP and vocabulary are split (tensor=4 splits the heads too).

Activations are constrained through `constrain(x, names)`, which is a no-op unless a mesh is active
(`with activate(mesh): ...`, entered inside the traced function so jit caches stay per mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("omnidiff_mesh", default=None)
_WARNED: set = set()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). One size may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into fsdp*tensor*data with fixed part {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                         f"does not match the {len(devices)} available devices")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
    """Logical axis names -> PartitionSpec, dropping mesh axes that are size 1, reused, or do not divide."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for axis in axes:
            size = mesh.shape[axis]
            if size == 1 or axis in used:
                continue
            if dim % (size * math.prod(mesh.shape[a] for a in keep)):
                key = (name, dim, axis, size)
                if key not in _WARNED:
                    _WARNED.add(key)
                    log.warning("axis %s (size %d) does not divide %s=%d; replicating that dimension",
                                axis, size, name, dim)
                continue
            keep.append(axis)
        used.update(keep)
        spec.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules=LOGICAL_RULES) -> NamedSharding:
    """The NamedSharding of one array on `mesh` from its logical axis names (`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of boxed (logically partitioned) abstract params, e.g. from `jax.eval_shape(init)`."""
    specs = nn.get_partition_spec(abstract_params)
    shapes = nn.meta.unbox(abstract_params)
    return jax.tree.map(lambda spec, x: named_sharding(tuple(spec), x.shape, mesh, rules),
                        specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules=LOGICAL_RULES):
    """Makes `constrain` shard activations on `mesh` while tracing inside this block."""
    token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, tuple] | None:
    """The (mesh, rules) that `activate` set for the code being traced, or None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op with no active mesh."""
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Inputs of rank `ndim` sharded on their leading (batch) axis over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
