"""The one key-map mechanism every converter uses: PyTorch state_dict keys <-> our parameter tree.

A `KeyMap` is a list of `Rule`s plus the keys dropped on purpose. A rule pairs a source key template with a
target path template, e.g.

    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/self_attn/q_proj/kernel", heads_in(28, 128))

`{i}` in the source but not the target means the target is stacked over layers (our `nn.scan` layout) and `i`
indexes its leading axis. Other `{name}` fields appear on both sides. A `Transform` turns the source tensor
into ours (transpose, reshape, weight-norm folding...) and back.

`KeyMap.plan` checks a whole checkpoint against the expected parameter shapes before a byte of data is read,
and raises one `ConversionError` listing every unexpected key, missing key and shape mismatch. `load` then
streams tensors one at a time (or, given shardings, only the slices each device holds); `export` runs the
rules backwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Mapping

import jax
import numpy as np

from omnidiff_jax.convert.sources import Source

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """Keys or shapes of a checkpoint do not match the model; the message lists every problem found."""


# --------------------------------------------------------------------------------------------------- transforms

@dataclasses.dataclass(frozen=True)
class Transform:
    """`forward(*source_tensors) -> ours`; `inverse(ours) -> source tensor` (None when not invertible).

    Both must work on NumPy arrays (returning views where possible) and on JAX tracers (for shape checks).
    """

    name: str
    forward: Callable[..., np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray] | None


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
LINEAR = Transform("transpose", lambda w: w.T, lambda k: k.T)  # torch [out, in] -> flax [in, out]
CONV1D = Transform("conv1d", lambda w: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0))  # [O,I,K]->[K,I,O]
CONV2D = Transform("conv2d", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # ->[H,W,I,O]


_COPY_THREADS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def copy_into(out: np.ndarray, view: np.ndarray, block_bytes: int = 1 << 20) -> None:
    """`out[...] = view`, fast when `view` is a transposed or reshaped view (the usual converter output).

    NumPy walks a transposed matrix element by element across cache lines; copying blocks along the view's
    outermost axis in memory keeps both sides in cache (about 4x faster for a bf16 [18944, 3584] transpose),
    and the blocks are spread over a few threads. A cast is done after the transpose, on contiguous data.
    """
    if view.ndim == 0 or view.flags.c_contiguous or not view.nbytes:
        out[...] = view
        return
    if view.dtype != out.dtype:
        same = np.empty(view.shape, view.dtype)
        copy_into(same, view, block_bytes)
        out[...] = same
        return
    axis = int(np.argmax(np.abs(view.strides)))
    step = max(1, block_bytes * view.shape[axis] // max(view.nbytes, 1))

    def copy(begin: int) -> None:
        index = (slice(None),) * axis + (slice(begin, begin + step),)
        out[index] = view[index]

    list(_COPY_THREADS.map(copy, range(0, view.shape[axis], step)))


def contiguous(view: np.ndarray, dtype=None) -> np.ndarray:
    """`view` as a C-contiguous array in `dtype` (default: its own), copied with `copy_into` when it is not one."""
    dtype = np.dtype(dtype or view.dtype)
    if view.flags.c_contiguous and view.dtype == dtype:
        return view
    out = np.empty(view.shape, dtype)
    copy_into(out, view)
    return out


def heads_out(num_heads: int, head_dim: int) -> Transform:
    """Linear [heads*head_dim, in] -> kernel [in, heads, head_dim] (head-major features)."""
    return Transform(f"heads_out({num_heads},{head_dim})",
                     lambda w: w.T.reshape(w.shape[1], num_heads, head_dim),
                     lambda k: k.reshape(k.shape[0], num_heads * head_dim).T)


def heads_bias(num_heads: int, head_dim: int) -> Transform:
    """Bias [heads*head_dim] -> [heads, head_dim]."""
    return Transform(f"heads_bias({num_heads},{head_dim})",
                     lambda b: b.reshape(num_heads, head_dim), lambda b: b.reshape(num_heads * head_dim))


def heads_in(num_heads: int, head_dim: int) -> Transform:
    """Linear [out, heads*head_dim] -> kernel [heads, head_dim, out]."""
    return Transform(f"heads_in({num_heads},{head_dim})",
                     lambda w: w.T.reshape(num_heads, head_dim, w.shape[0]),
                     lambda k: k.reshape(num_heads * head_dim, k.shape[-1]).T)


def weight_norm(then: Transform = IDENTITY) -> Transform:
    """Folds torch weight norm (dim 0) from sources (v, g): w = v * (g / ||v||), the L2 norm over every axis but 0,
    no epsilon, computed in the stored layout before `then` (so a ConvTranspose's in-channel dim 0 needs nothing
    special). g must be [v.shape[0], 1, ...]. Not invertible."""

    def fold(v, g):
        if tuple(g.shape) != (v.shape[0],) + (1,) * (v.ndim - 1):
            raise ValueError(f"weight-norm g has shape {tuple(g.shape)}, v has {tuple(v.shape)}")
        norm = (v * v).sum(axis=tuple(range(1, v.ndim)), keepdims=True) ** 0.5
        return then.forward(v * (g / norm))

    return Transform(f"weight_norm({then.name})", fold, None)


# --------------------------------------------------------------------------------------------------- rules

_FIELD = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern:
    parts = _FIELD.split(template)
    out = []
    for n, part in enumerate(parts):
        out.append(f"(?P<{part}>\\d+)" if n % 2 else re.escape(part))
    return re.compile("".join(out))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source key template(s) -> target path template, with a transform.

    `src` may be a tuple when one target is built from several source tensors (weight norm: `weight_v`,
    `weight_g`); the transform's `forward` then receives them in that order.
    """

    src: str | tuple[str, ...]
    dst: str
    transform: Transform = IDENTITY

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.src,) if isinstance(self.src, str) else self.src

    @property
    def stacked(self) -> bool:
        return "{i}" in self.sources[0] and "{i}" not in self.dst


@dataclasses.dataclass
class _Entry:
    """How to build one target leaf: source keys per stack index (or a single entry), and the transform."""

    path: str
    rule: Rule
    keys: dict[int | None, tuple[str, ...]]


@dataclasses.dataclass
class Plan:
    """A checked mapping from target leaves to source keys. Built by `KeyMap.plan`."""

    entries: dict[str, _Entry]
    dropped: dict[str, str]  # source key -> reason


def flatten(tree) -> dict[str, object]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)] = leaf
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Rules plus source keys dropped on purpose (regex -> reason, logged when a checkpoint has them)."""

    rules: tuple[Rule, ...]
    drop: tuple[tuple[str, str], ...] = ()

    def plan(self, source_shapes: Mapping[str, tuple[int, ...]], target_shapes: Mapping[str, tuple[int, ...]],
             origin: str = "checkpoint") -> Plan:
        """Matches every source key and target leaf, checks shapes, and raises one error listing all problems."""
        rule_res = [(r, [_template_regex(s) for s in r.sources], _template_regex(r.dst)) for r in self.rules]
        drop_res = [(re.compile(p), why) for p, why in self.drop]
        entries: dict[str, _Entry] = {}
        dropped: dict[str, str] = {}
        unexpected: list[str] = []
        consumed: set[str] = set()
        for key in source_shapes:
            if key in consumed:
                continue
            for rule, src_res, _ in rule_res:
                m = next((m for r in src_res if (m := r.fullmatch(key))), None)  # any source: files order freely
                if not m:
                    continue
                fields = m.groupdict()
                i = int(fields["i"]) if rule.stacked else None
                path = rule.dst.format(**fields)
                keys = tuple(s.format(**fields) for s in rule.sources)
                entry = entries.setdefault(path, _Entry(path, rule, {}))
                entry.keys[i] = keys
                consumed.update(keys)
                break
            else:
                reason = next((why for r, why in drop_res if r.fullmatch(key)), None)
                if reason is None:
                    unexpected.append(key)
                else:
                    dropped[key] = reason

        problems: list[str] = []
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) in {origin}: " + ", ".join(sorted(unexpected)))
        missing = []
        for path, shape in target_shapes.items():
            entry = entries.get(path)
            if entry is None:
                missing.append(_missing_name(rule_res, path, shape))
                continue
            n = shape[0] if entry.rule.stacked else None
            want = [None] if n is None else list(range(n))
            for i in want:
                if i not in entry.keys:
                    missing.append(entry.rule.sources[0].replace("{i}", str(i)))
                    continue
                for k in entry.keys[i]:
                    if k not in source_shapes:
                        missing.append(k)
                if any(k not in source_shapes for k in entry.keys[i]):
                    continue
                got = _forward_shape(entry.rule.transform, tuple(tuple(source_shapes[k]) for k in entry.keys[i]))
                expect = tuple(shape[1:]) if entry.rule.stacked else tuple(shape)
                if got != expect:
                    problems.append(f"shape mismatch for {entry.keys[i][0]!r}: found "
                                    f"{tuple(source_shapes[entry.keys[i][0]])}, which maps to {got}; "
                                    f"{path} expects {expect}")
            extra = sorted(set(entry.keys) - set(want))
            if extra:
                problems.append(f"{path}: {origin} has layer indices {extra} beyond the model's {n}")
        for path in entries.keys() - target_shapes.keys():
            problems.append(f"keys {list(entries[path].keys.values())[0]} map to {path}, which the model lacks")
        if missing:
            problems.append(f"{len(missing)} missing key(s) in {origin}: " + ", ".join(sorted(set(missing))))
        if problems:
            raise ConversionError("cannot convert " + origin + ":\n  - " + "\n  - ".join(problems))
        for key, why in dropped.items():
            log.info("dropping %s: %s", key, why)
        return Plan({p: entries[p] for p in target_shapes}, dropped)

    # ----------------------------------------------------------------------------------------- import

    def load(self, source: Source, target: Mapping[str, jax.ShapeDtypeStruct], *, dtype=None,
             shardings: Mapping[str, jax.sharding.Sharding] | None = None,
             on_tensor: Callable[[str, int], None] | None = None) -> dict:
        """Builds the parameter tree from `source`, one target leaf at a time.

        target: flat {path: ShapeDtypeStruct} of the model's parameters. dtype: cast to this (default: keep the
        source dtype). shardings: flat {path: Sharding}; when given, each leaf is assembled with
        `jax.make_array_from_callback`, reading only the slices the local devices hold. on_tensor(key, nbytes)
        is called for each source tensor read (progress bars).
        """
        plan = self.plan({k: v.shape for k, v in source.items()}, {k: v.shape for k, v in target.items()},
                         source.description)
        out = {}
        for path, entry in plan.entries.items():
            shape = tuple(target[path].shape)
            leaf_dtype = np.dtype(dtype) if dtype is not None else _source_dtype(source, entry)
            read = _leaf_reader(source, entry, leaf_dtype, on_tensor)
            if shardings is None:
                out[path] = jax.device_put(read((slice(None),) * len(shape)))
            else:
                out[path] = jax.make_array_from_callback(shape, shardings[path], read)
        return unflatten(out)

    # ----------------------------------------------------------------------------------------- export

    def export(self, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (source key, NumPy array) for every tensor, running each rule's transform backwards.

        Tensors come one at a time (a stacked leaf is split per layer), so a writer can stream them to disk.
        """
        flat = flatten(params)
        rule_res = [(r, _template_regex(r.dst)) for r in self.rules]
        for path, leaf in flat.items():
            for rule, dst_re in rule_res:
                m = dst_re.fullmatch(path)
                if m:
                    break
            else:
                raise ConversionError(f"no rule exports parameter {path}")
            if rule.transform.inverse is None or len(rule.sources) > 1:
                raise ConversionError(f"{path}: transform {rule.transform.name} cannot be inverted for export")
            arr = np.asarray(jax.device_get(leaf))
            if rule.stacked:
                for i in range(arr.shape[0]):
                    yield rule.sources[0].format(i=i, **m.groupdict()), contiguous(rule.transform.inverse(arr[i]))
            else:
                yield rule.sources[0].format(**m.groupdict()), contiguous(rule.transform.inverse(arr))


def _missing_name(rule_res, path: str, shape: tuple[int, ...]) -> str:
    """The source key(s) a target leaf with no source would have needed, for the error message."""
    for rule, _, dst_re in rule_res:
        m = dst_re.fullmatch(path)
        if m:
            if rule.stacked:
                return rule.sources[0].format(i=f"{{0..{shape[0] - 1}}}", **m.groupdict())
            return rule.sources[0].format(**m.groupdict())
    return f"<no rule produces {path}>"


@functools.lru_cache(maxsize=4096)  # a model's layers repeat a few shapes hundreds of times
def _forward_shape(transform: Transform, shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    structs = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
    try:
        return tuple(jax.eval_shape(transform.forward, *structs).shape)
    except (TypeError, ValueError) as e:
        return (f"<{transform.name} fails: {e}>",)  # reported as a mismatch


def _source_dtype(source: Source, entry: _Entry) -> np.dtype:
    return source[next(iter(entry.keys.values()))[0]].dtype


def _leaf_reader(source: Source, entry: _Entry, dtype: np.dtype, on_tensor) -> Callable:
    """Returns read(index) -> np.ndarray for a tuple of slices over the target leaf."""

    def one(keys: tuple[str, ...], index: tuple) -> np.ndarray:
        if len(keys) == 1:  # only the bytes of the slice are read
            part = source[keys[0]].read_part(lambda tensor: entry.rule.transform.forward(tensor)[index])
        else:
            part = entry.rule.transform.forward(*(source[k].read() for k in keys))[index]
        if on_tensor is not None:
            for k in keys:
                on_tensor(k, source[k].nbytes)
        return np.asarray(part, dtype=dtype)

    def read(index: tuple) -> np.ndarray:
        if not entry.rule.stacked:
            return one(entry.keys[None], index)
        layers = range(len(entry.keys))[index[0]]
        return np.stack([one(entry.keys[i], tuple(index[1:])) for i in layers])

    return read
