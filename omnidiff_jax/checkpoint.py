"""Reading and writing model checkpoints: the one module that loads, imports, exports and verifies them.

A model checkpoint comes in two forms:

    reference   the Hugging Face folder Omni-Diffusion ships (config.json + safetensors, sharded with an index or
                not), or one .safetensors/.pt/.bin file with config.json beside it
    orbax       the self-contained folder `import_checkpoint` writes from one (`convert.orbax_io`): parameters,
                omnidiff.json (configs, per-leaf checksums) and the tokenizer files

Both hold the Dream LLM, and the speech input (SenseVoice encoder + projector) when the reference has any
`model.audio_*` key: one rule, `convert.omni.has_speech`, for every reader. Both go through the same key maps
(`convert.omni.param_groups`), so loading a reference folder directly and loading its import give the same
parameters bit for bit.

`import_checkpoint` streams a reference checkpoint into an orbax folder: each parameter leaf is built from its
source tensors and handed to a background writer, which drops it once written, so memory stays within the
writer's queue (`orbax_io.PENDING_BYTES`) plus the largest leaf however big the model. `export_checkpoint` runs
the same key maps backwards, from an orbax folder or an `OmniModel` in memory, into sharded safetensors (each at
most 5 GB) with an index, a reference config.json and the tokenizer files; tensors come back bit for bit.
Plans for all groups are checked before any data is read, and every problem is reported in one error.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from omnidiff_jax.convert import orbax_io
from omnidiff_jax.convert.dream import check_field_types, hf_config, read_hf_config
from omnidiff_jax.convert.keymap import IDENTITY, ConversionError, Plan, copy_into, flatten, unflatten
from omnidiff_jax.convert.omni import (INDEX_FILE, LLM_GROUP, SPEECH_GROUP, ParamGroup, Speech, chunk_axes,
                                       dream_group, folder_meta, has_speech, hf_files, param_groups, plan_groups,
                                       speech_configs, speech_dtype, speech_group, split_groups, split_source,
                                       stored_config)
from omnidiff_jax.convert.sources import CheckpointError, Source, open_source, read_json, write_safetensors
from omnidiff_jax.model import OmniModel
from omnidiff_jax.models.dream import DreamConfig, unstack_layers
from omnidiff_jax.sharding import named_sharding
from omnidiff_jax.speech_in import SpeechInput
from omnidiff_jax.vocab import TokenLayout

MAX_SHARD_BYTES = 5 * 10**9
BATCH_BYTES = 256 << 20  # small leaves are handed to orbax together (and exported together), up to this size

# progress(total tensors, total bytes) is called once and returns on_tensor(key, nbytes), called per tensor.
Progress = Callable[[int, int], Callable[[str, int], None]]


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a conversion did: tensors read (import) or written (export), their parameters and bytes."""

    tensors: int
    parameters: int
    nbytes: int
    dtypes: tuple[str, ...]
    seconds: float
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # source key -> reason

    def __str__(self) -> str:
        rate = self.nbytes / max(self.seconds, 1e-9) / 1e6
        text = (f"{self.tensors} tensors, {self.parameters:,} parameters, {self.nbytes / 1e9:.3f} GB "
                f"{'/'.join(self.dtypes)}, {self.seconds:.1f} s ({rate:.0f} MB/s)")
        if self.dropped:
            reasons = sorted(set(self.dropped.values()))
            text += f"; dropped {len(self.dropped)} tensor(s): " + "; ".join(reasons)
        return text


# --------------------------------------------------------------------------------------------------- load

def load_model(path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None, verify: bool = False,
               **overrides) -> OmniModel:
    """Loads a reference Hugging Face Dream folder (config.json + safetensors, sharded or not), or the orbax
    folder `omnidiff convert import` writes from one.

    dtype: 'float32' or 'bfloat16' for parameters and compute (default: the checkpoint's dtype). mesh: load
    straight into the sharded layout (each process reads only the slices its devices hold, so a model larger than
    one device, or than host memory, loads); the small speech input is replicated. verify: first check every
    leaf of an orbax folder against the checksum its import recorded. overrides: DreamConfig fields such as
    remat_policy or attention_impl. The model holds one parameter tree per layer (`models.dream.unstack_layers`;
    `stack_layers` gives the training layout).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if orbax_io.is_checkpoint(path):
        if verify:
            verify_checkpoint(path, raise_problems=True)
        return _load_orbax(path, dtype, mesh, overrides)
    if verify:
        raise CheckpointError(f"{path}: verify=True needs an orbax folder from `omnidiff convert import` (it records "
                              "the checksums); a reference folder has none")
    return _load_reference(path, dtype, mesh, overrides)


def _load_reference(path: Path, dtype: str | None, mesh: Mesh | None, overrides: dict) -> OmniModel:
    cfg, layout, raw = read_hf_config(path)
    source = open_source(path)
    speech = speech_configs(raw, cfg.param_dtype, path / "config.json") if has_speech(source) else None
    cfg, speech = _with_dtype(cfg, speech, dtype, overrides)
    groups = param_groups(cfg, speech)
    plan_groups(source, groups)  # every key and shape problem of every group, in one error, before any read
    params = {}
    for group, part in zip(groups, split_source(source, groups)):
        dtype_of = cfg.param_dtype if group.name == LLM_GROUP else speech[0].param_dtype
        params[group.name] = group.keymap.load(part, group.target, dtype=dtype_of, shardings=_shardings(group, mesh))
    return OmniModel(cfg, layout, unstack_layers(params[LLM_GROUP], consume=True), mesh, _tokenizer(path),
                     _speech_input(speech, params))


def _load_orbax(path: Path, dtype: str | None, mesh: Mesh | None, overrides: dict) -> OmniModel:
    cfg, layout, speech = _stored_config(path)
    cfg, speech = _with_dtype(cfg, speech, dtype, overrides)
    groups = param_groups(cfg, speech)
    target = {}
    for g in groups:
        shardings = _shardings(g, mesh)
        target.update({f"{g.name}/{p}": jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=shardings[p])
                       for p, t in g.target.items()})
    params = split_groups(orbax_io.restore(path, target))
    return OmniModel(cfg, layout, unstack_layers(params[LLM_GROUP], consume=True), mesh,
                     _tokenizer(path / orbax_io.FILES_DIR), _speech_input(speech, params))


def _with_dtype(cfg: DreamConfig, speech: Speech | None, dtype: str | None,
                overrides: dict) -> tuple[DreamConfig, Speech | None]:
    """The stored configs with `load_model`'s dtype (for the LLM and the speech input) and DreamConfig overrides."""
    if dtype is not None:
        overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
        speech = speech and speech_dtype(speech, dtype)
    return cfg.replace(**overrides), speech


def _shardings(group: ParamGroup, mesh: Mesh | None) -> dict[str, jax.sharding.Sharding]:
    """{path: sharding} of a group's leaves: by the logical rules on `mesh` for the leaves with logical axis names
    (the LLM's), the rest replicated; on the default device without a mesh."""
    if mesh is None:
        return dict.fromkeys(group.target, SingleDeviceSharding(jax.devices()[0]))
    return {p: named_sharding(group.axes.get(p, ()), t.shape, mesh) for p, t in group.target.items()}


def _tokenizer(folder: Path) -> str | None:
    """The folder holding a checkpoint's tokenizer files, if it has them."""
    return str(folder) if (folder / "tokenizer_config.json").exists() else None


def _speech_input(speech: Speech | None, params: dict) -> SpeechInput | None:
    return SpeechInput(*speech, params[SPEECH_GROUP]) if speech is not None else None


def _stored_config(path: Path) -> tuple[DreamConfig, TokenLayout, Speech | None]:
    return stored_config(orbax_io.read_meta(path), path / orbax_io.META_FILE)


def load_speech(path: str | os.PathLike, dtype: str) -> SpeechInput:
    """The speech input (SenseVoice encoder + projector) alone of a reference folder or an orbax folder, in
    `dtype` (the LLM's is skipped: nothing of it is read)."""
    path = Path(path)
    if orbax_io.is_checkpoint(path):
        _, _, speech = _stored_config(path)
        if speech is not None:
            speech = speech_dtype(speech, dtype)
            group = speech_group(speech)
            params = orbax_io.restore(path, {f"{SPEECH_GROUP}/{p}": t for p, t in group.target.items()})
            return SpeechInput(*speech, split_groups(params)[SPEECH_GROUP])
    else:
        _, _, raw = read_hf_config(path)
        source = open_source(path)
        if has_speech(source):
            speech = speech_configs(raw, dtype, path / "config.json")
            group = speech_group(speech)
            part = Source({k: ref for k, ref in source.items() if re.fullmatch(group.claims, k)}, source.description)
            return SpeechInput(*speech, group.keymap.load(part, group.target, dtype=speech[0].param_dtype))
    raise CheckpointError(f"{path}: holds no speech input (no model.audio_model.* or model.audio_projection.* "
                          "weights)")


def load_dream_params(path: str | os.PathLike, cfg: DreamConfig, mesh: Mesh | None = None) -> dict:
    """The LLM weights of a Hugging Face Dream folder whose shape matches `cfg` except, possibly, a smaller
    vocabulary (Dream-v0-Base-7B for stage 1), in float32 and with the folder's vocabulary; with a mesh, read
    straight into the sharded layout."""
    config_path = Path(path) / "config.json"
    raw = read_json(config_path, "not a Dream checkpoint (no config.json)")
    check_field_types(raw, config_path)
    fields = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
              "intermediate_size": cfg.intermediate_size}
    wrong = [f"{k} {raw.get(k)} (config has {v})" for k, v in fields.items() if raw.get(k) != v]
    if wrong:
        raise CheckpointError(f"{config_path}: shape does not match the training config: {', '.join(wrong)}")
    if not isinstance(raw.get("vocab_size"), int):
        raise CheckpointError(f"{config_path}: vocab_size must be an integer, got {raw.get('vocab_size')!r}")
    group = dream_group(cfg.replace(vocab_size=raw["vocab_size"]))
    shardings = None if mesh is None else _shardings(group, mesh)
    return group.keymap.load(open_source(path), group.target, dtype=np.float32, shardings=shardings)


# --------------------------------------------------------------------------------------------------- verify

def verify_checkpoint(path: str | os.PathLike, raise_problems: bool = False) -> list[str]:
    """Checks every parameter leaf of an orbax folder against the checksum its import recorded: one line per
    problem (a damaged file, a leaf whose bytes changed, one missing or unlisted), [] when intact. With
    `raise_problems`, problems raise one CheckpointError instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    problems = orbax_io.verify(path)
    if problems and raise_problems:
        raise CheckpointError("\n".join(problems))
    return problems


# --------------------------------------------------------------------------------------------------- import

def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                      force: bool = False, progress: Progress | None = None) -> Summary:
    """Converts the reference checkpoint `src` into the orbax folder `dst` (refused if it exists, unless `force`).

    src: a Hugging Face folder (config.json + safetensors, sharded with an index or not) or one weights file
    with config.json beside it. dtype: 'float32' or 'bfloat16' to cast (default: keep the source dtype).
    Every source tensor is mapped or dropped with a logged reason; all key and shape problems are raised
    together before anything is written. The folder records a checksum of every leaf (`verify_checkpoint`).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"{src}: does not exist")
    folder = src if src.is_dir() else src.parent
    _refuse_overlap(folder, dst)
    cfg, layout, raw = read_hf_config(folder)
    source = open_source(src)
    cache = _PageCache(source)
    speech = speech_configs(raw, cfg.param_dtype, folder / "config.json") if has_speech(source) else None
    plans = plan_groups(source, param_groups(cfg, speech))
    dtypes_by_leaf = {(g.name, p): np.dtype(dtype) if dtype else source[_first_key(plan, p)].dtype
                      for g, plan in plans for p in plan.entries}
    dtypes = sorted({dt.name for dt in dtypes_by_leaf.values()})
    if len(dtypes) == 1 and dtypes[0] in ("float32", "bfloat16", "float16"):
        cfg = cfg.replace(dtype=dtypes[0], param_dtype=dtypes[0])
        speech = speech and speech_dtype(speech, dtypes[0])
    keys = [k for _, plan in plans for e in plan.entries.values() for ks in e.keys.values() for k in ks]
    total = sum(source[k].nbytes for k in keys)
    on_tensor = progress(len(keys), total) if progress else None

    leaves = [(group, path, entry, group.target[path].shape, dtypes_by_leaf[group.name, path])
              for group, plan in plans for path, entry in plan.entries.items()]
    # Leaves that are their source tensor unchanged (the embedding, the output head) go first, largest first (the
    # others keep their order): the writer reads them from the source while the leaves that need work are built.
    leaves.sort(key=lambda leaf: -_nbytes(*leaf[3:]) if _is_view(source, leaf[2], leaf[4]) else 0)
    uses = collections.Counter(k for leaf in leaves for keys in leaf[2].keys.values() for k in keys)
    with orbax_io.writing(dst, force, chunk_axes=chunk_axes([g for g, _ in plans])) as ckpt:
        batch, batch_keys, batch_views, batch_bytes = {}, [], [], 0

        def hand_over():  # progress counts a source tensor once its leaf is on disk
            nonlocal batch, batch_keys, batch_views, batch_bytes
            ckpt.add_params(unflatten(batch), functools.partial(
                _written, on_tensor, [(k, source[k].nbytes) for k in batch_keys], cache, batch_views))
            batch, batch_keys, batch_views, batch_bytes = {}, [], [], 0  # the writer alone holds the leaves now

        cache.prefetch(leaves[0][2].keys.values())
        for n, (group, path, entry, shape, leaf_dtype) in enumerate(leaves):
            ckpt.make_room(batch_bytes + _nbytes(shape, leaf_dtype))
            if n + 1 < len(leaves):
                cache.prefetch(leaves[n + 1][2].keys.values())
            batch[f"{group.name}/{path}"], copied = _build_leaf(source, entry, shape, leaf_dtype)
            leaf_keys = [k for keys in entry.keys.values() for k in keys]
            # source tensors no other leaf reads leave the page cache once read: once copied, or when written
            unshared = [k for k in leaf_keys if uses[k] == 1]
            if copied:
                cache.release(unshared)
            else:
                batch_views += unshared
            batch_keys += leaf_keys
            batch_bytes += _nbytes(shape, leaf_dtype)
            if batch_bytes >= BATCH_BYTES:
                hand_over()
        if batch:
            hand_over()
        for file in hf_files(folder):
            ckpt.add_file(file)
        dropped = {k: why for _, plan in plans for k, why in plan.dropped.items()}
        ckpt.meta.update(folder_meta(cfg, layout, speech), source=str(src.absolute()), dropped=dropped)
    parameters = sum(int(np.prod(g.target[p].shape)) for g, plan in plans for p in plan.entries)
    return Summary(len(keys), parameters, total, tuple(dtypes), time.perf_counter() - start, dropped)


def _first_key(plan: Plan, path: str) -> str:
    return next(iter(plan.entries[path].keys.values()))[0]


def _is_view(source: Source, entry, dtype: np.dtype) -> bool:
    """True when `_build_leaf` will return the leaf's one source tensor itself, uncopied: an unstacked leaf whose
    rule changes nothing, in the source's dtype."""
    (index, keys), = entry.keys.items() if len(entry.keys) == 1 else ((0, ()),)
    return index is None and entry.rule.transform is IDENTITY and source[keys[0]].dtype == dtype


def _build_leaf(source: Source, entry, shape, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """One target leaf from its source tensors (one per layer when stacked), through the rule's transform, and
    whether it was copied out of them.

    A leaf that is its source tensor unchanged or reshaped (an embedding, a norm) is not copied at all.
    """
    out = None
    for i, keys in entry.keys.items():
        view = np.asarray(entry.rule.transform.forward(*(source[k].read() for k in keys)))
        if i is None and view.flags.c_contiguous and view.dtype == dtype:
            return view, False
        out = np.empty(shape, dtype) if out is None else out
        copy_into(out if i is None else out[i], view)
    return out, True


def _written(on_tensor: Callable[[str, int], None] | None, tensors: list[tuple[str, int]],
             cache: _PageCache, views: list[str]) -> None:
    """A batch is on disk (and dropped): progress counts its tensors, and the source tensors its leaves were
    views of leave the page cache."""
    cache.release(views)
    for key, nbytes in tensors if on_tensor is not None else ():
        on_tensor(key, nbytes)


class _PageCache:
    """Advice to the kernel about a source's safetensors tensors (files stored raw, `TensorRef.offset` set).

    `prefetch(key_lists)` starts reading tensors into the page cache (posix_fadvise WILLNEED) in the background,
    so the disk works on the next leaf while this one is converted; `release(keys)` drops tensors no longer
    needed from it (DONTNEED), so that the memory they held is reused at once for what the import writes rather
    than fresh memory taken (on a VM, first touching memory is what costs). Advice is best effort: a filesystem
    that refuses it changes nothing else.
    """

    def __init__(self, source: Source):
        self.source = source
        self._readahead = ThreadPoolExecutor(max_workers=1)
        self._released: set[str] = set()  # not to be read ahead again by a prefetch that fell behind

    def prefetch(self, key_lists) -> None:
        self._readahead.submit(self._advise, [k for keys in key_lists for k in keys], "POSIX_FADV_WILLNEED")

    def release(self, keys: list[str]) -> None:
        self._released.update(keys)
        self._advise(keys, "POSIX_FADV_DONTNEED")

    def _advise(self, keys: list[str], advice: str) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        for ref in (self.source[k] for k in keys):
            if ref.offset is None or not ref.nbytes or (advice == "POSIX_FADV_WILLNEED" and ref.key in self._released):
                continue
            try:
                fd = os.open(ref.origin, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, ref.offset, ref.nbytes, getattr(os, advice))
                finally:
                    os.close(fd)
            except OSError:
                pass


def _refuse_overlap(src: Path, dst: Path) -> None:
    src, dst = src.resolve(), dst.resolve()
    if src == dst or dst in src.parents or src in dst.parents:
        raise CheckpointError(f"destination {dst} overlaps the source {src}; choose a separate folder")


# --------------------------------------------------------------------------------------------------- export

def export_checkpoint(src: str | os.PathLike | OmniModel, dst: str | os.PathLike, force: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES, progress: Progress | None = None) -> Summary:
    """Writes a reference Hugging Face folder at `dst` (refused if it exists, unless `force`).

    src: an orbax folder from `import_checkpoint` (read one leaf at a time) or an `OmniModel`. Output: shards
    `model-0000k-of-0000n.safetensors` of at most `max_shard_bytes` (a bigger tensor gets a shard of its own),
    `model.safetensors.index.json`, config.json (model_type Dream, the reference auto_map) and the source's
    tokenizer and other non-weight files. Tensors keep their stored dtype.
    """
    start = time.perf_counter()
    dst = Path(dst)
    if isinstance(src, OmniModel):
        cfg, layout, files = src.config, src.layout, Path(src.tokenizer_path) if src.tokenizer_path else None
        trees = {LLM_GROUP: {k: v for k, v in src.params.items() if k != "layers"}}
        speech = None
        if src.speech is not None:
            speech, trees[SPEECH_GROUP] = (src.speech.encoder, src.speech.projector), src.speech.params
        leaves = {f"{g}/{p}": v for g, tree in trees.items() for p, v in flatten(tree).items()}
        stored = {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in leaves.items()}
        # the per-layer leaves, stacked into the checkpoint layout on the host one leaf at a time when fetched
        layers = [flatten(layer) for layer in src.params["layers"]]
        layer_leaves = {f"{LLM_GROUP}/layers/{p}": [layer[p] for layer in layers] for p in layers[0]}
        stored.update({p: jax.ShapeDtypeStruct((len(v), *v[0].shape), v[0].dtype) for p, v in layer_leaves.items()})

        def fetch(paths):
            return {p: np.stack(jax.device_get(layer_leaves[p])) if p in layer_leaves else leaves[p] for p in paths}
    else:
        src = Path(src)
        if not src.exists():
            raise CheckpointError(f"{src}: does not exist")
        _refuse_overlap(src, dst)
        cfg, layout, speech = _stored_config(src)
        files = src / orbax_io.FILES_DIR
        stored = orbax_io.stored_leaves(src)

        def fetch(paths):
            return orbax_io.restore(src, {p: stored[p] for p in paths})
    groups = param_groups(cfg, speech)
    _check_leaves(stored, groups)
    manifest = [(p, key, shape, stored[p].dtype) for g in groups for p, key, shape in _export_manifest(g, stored)]
    shards = _pack(manifest, [_nbytes(shape, dt) for *_, shape, dt in manifest], max_shard_bytes)
    total = sum(_nbytes(shape, dt) for *_, shape, dt in manifest)
    on_tensor = progress(len(manifest), total) if progress else None
    stream = _export_stream(groups, stored, fetch, on_tensor)
    dtypes = sorted({np.dtype(dt).name for *_, dt in manifest})

    with orbax_io.staging_folder(dst, force) as tmp:
        weight_map = {}
        for n, shard in enumerate(shards):
            name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / name, {key: _Pending(key, shape, dt, stream) for _, key, shape, dt in shard},
                              metadata={"format": "pt"})
            weight_map.update({key: name for _, key, _, _ in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        original = {}
        for file in hf_files(files) if files is not None else []:
            if file.name == "config.json":
                original = json.loads(file.read_text())
            else:
                (tmp / file.name).write_bytes(file.read_bytes())
        config = {**original, **hf_config(cfg, layout, dtypes[0] if len(dtypes) == 1 else cfg.param_dtype)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    parameters = sum(int(np.prod(shape)) for *_, shape, _ in manifest)
    return Summary(len(manifest), parameters, total, tuple(dtypes), time.perf_counter() - start)


def _check_leaves(stored: Mapping[str, jax.ShapeDtypeStruct], groups: list[ParamGroup]) -> None:
    want = {f"{g.name}/{p}": tuple(t.shape) for g in groups for p, t in g.target.items()}
    problems = [f"{p}: missing" for p in want if p not in stored]
    problems += [f"{p}: not part of the model" for p in stored if p not in want]
    problems += [f"{p}: shape {tuple(stored[p].shape)}, the config needs {s}" for p, s in want.items()
                 if p in stored and tuple(stored[p].shape) != s]
    if problems:
        raise ConversionError("parameters do not match their config:\n  - " + "\n  - ".join(problems))


def _export_manifest(group: ParamGroup, stored: Mapping[str, jax.ShapeDtypeStruct]):
    """(leaf path, source key, shape) of every tensor the group exports, in export order, reading no data.

    Runs the key map's own export on zero-byte stand-ins (NumPy dtype V0) of each leaf.
    """
    for path in group.target:
        standin = np.empty(stored[f"{group.name}/{path}"].shape, "V0")
        for key, arr in group.keymap.export(unflatten({path: standin})):
            yield f"{group.name}/{path}", key, tuple(arr.shape)


def _export_stream(groups, stored, fetch, on_tensor) -> Iterator[tuple[str, np.ndarray]]:
    """(source key, tensor) in manifest order; leaves are fetched a few at a time (up to `BATCH_BYTES`)."""
    paths = [f"{g.name}/{p}" for g in groups for p in g.target]
    keymaps = {f"{g.name}/{p}": g.keymap for g in groups for p in g.target}
    for chunk in _pack(paths, [_nbytes(stored[p].shape, stored[p].dtype) for p in paths], BATCH_BYTES):
        leaves = fetch(chunk)
        for path in chunk:
            leaf = np.asarray(jax.device_get(leaves.pop(path)))
            for key, arr in keymaps[path].export(unflatten({path.split("/", 1)[1]: leaf})):
                if on_tensor is not None:
                    on_tensor(key, arr.nbytes)
                yield key, arr
            del leaf


class _Pending:
    """A tensor known by key, shape and dtype; its data is the next item of the export stream, when asked for."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype, stream: Iterator[tuple[str, np.ndarray]]):
        self.key, self.shape, self.dtype, self._stream = key, shape, np.dtype(dtype), stream

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        key, arr = next(self._stream)
        if key != self.key or arr.shape != self.shape:
            raise ConversionError(f"export stream gave {key} {arr.shape}, expected {self.key} {self.shape}")
        return arr


def _pack(items: list, sizes: list[int], max_bytes: int) -> list[list]:
    """Consecutive items grouped into runs of at most `max_bytes` (a bigger item gets a run of its own)."""
    runs, total = [[]], 0
    for item, size in zip(items, sizes):
        if runs[-1] and total + size > max_bytes:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


__all__ = ["Summary", "load_model", "load_speech", "load_dream_params", "verify_checkpoint", "import_checkpoint",
           "export_checkpoint", "MAX_SHARD_BYTES", "BATCH_BYTES"]
