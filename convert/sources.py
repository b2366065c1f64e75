"""Lazy, memory-mapped readers for PyTorch checkpoints: safetensors (single or sharded) and `.pt` pickles.

A `Source` maps checkpoint key names to `TensorRef`s. Nothing is read until `TensorRef.read()` is called, and
then only as a NumPy view on a memory map, so slicing a view touches only the pages that slice needs. This is
what lets the converters stream a 16 GB checkpoint tensor by tensor. A sharded load reads only the slices its
devices hold with `TensorRef.read_part`: ranged reads of just those bytes, not the memory map (whose page faults
make the kernel read ahead megabytes around each touched page).

The safetensors reader is our own (the format is an 8-byte header length, a JSON header and raw little-endian
data) because the `safetensors` NumPy backend cannot represent bfloat16; we use `ml_dtypes.bfloat16` for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from omnidiff_jax.files import atomic_write

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent. The message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: its shape, dtype, and a function returning a (lazy) NumPy view of it."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    origin: str  # the file it lives in, for error messages
    _read: Callable[[], np.ndarray]
    offset: int | None = None  # where its bytes start in `origin`, when stored there raw (safetensors)

    def read(self) -> np.ndarray:
        """The whole tensor (from safetensors, a view on a memory map of its bytes: nothing is read until touched)."""
        return self._read()

    def read_part(self, select: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """`select(tensor)` as an array of its own, where `select` returns a view of the tensor (a transpose, a
        reshape, basic slicing: what a key map does). A tensor stored raw in a file (`offset` set) is read with
        ranged reads of the bytes the view covers (`_read_view`), so a slice along the minor axis reads its
        span of each row and no more, without touching the memory map (which a `select` that copies does)."""
        whole = self.read()
        part = select(whole)
        if self.offset is None or not part.size or not np.may_share_memory(part, whole):
            return np.asarray(part)
        return _read_view(self.origin, self.offset + part.ctypes.data - whole.ctypes.data, part)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _read_view(path: str, start: int, view: np.ndarray) -> np.ndarray:
    """A copy of `view`, a strided view of the bytes of `path` whose first element is at byte `start`, read with
    one pread per run of contiguous bytes: a slice of a [rows, columns] tensor along its columns is one read per
    row, of that row's span. Nothing between the runs is read, not even to save syscalls: merging the runs of a
    tensor split on its minor axis would read all of it."""
    axes = sorted((a for a in range(view.ndim) if view.shape[a] > 1), key=lambda a: -view.strides[a])
    if any(view.strides[a] <= 0 for a in axes):
        return np.array(view)  # not a key map's view
    shape, strides = [view.shape[a] for a in axes], [view.strides[a] for a in axes]
    run, inner = view.itemsize, len(axes)  # the innermost axes that are contiguous make one run of `run` bytes
    while inner and strides[inner - 1] == run:
        inner -= 1
        run *= shape[inner]
    offsets = np.array([start], np.int64)
    for n, stride in zip(shape[:inner], strides[:inner]):
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * stride).reshape(-1)
    out = np.empty(shape, view.dtype)  # the view's axes in file order
    flat = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead beyond what is asked
        for n, offset in enumerate(offsets.tolist()):
            done = 0
            while done < run:  # one read returns at most 2 GB
                got = os.preadv(f.fileno(), [flat[n * run + done:(n + 1) * run]], offset + done)
                if not got:
                    raise CheckpointError(f"{path}: truncated at byte {offset + done}")
                done += got
    return out.transpose(np.argsort(axes)).reshape(view.shape)


class Source(Mapping[str, TensorRef]):
    """A read-only mapping from checkpoint key to `TensorRef`."""

    def __init__(self, refs: dict[str, TensorRef], description: str):
        self._refs = refs
        self.description = description

    def __getitem__(self, key: str) -> TensorRef:
        return self._refs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"Source({self.description!r}, {len(self)} tensors)"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Returns (header dict without `__metadata__`, byte offset where the data starts). Validates the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for key, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {key!r} spans {end - begin} bytes, its shape needs {expected}")
        if start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {start + end} but the file has {size} bytes")
    return header, start


def read_json(path: str | os.PathLike, missing: str) -> dict:
    """Parses a JSON file; CheckpointError "<path>: <missing>" when it does not exist, or naming it when invalid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def safetensors_file(path: str | os.PathLike) -> Source:
    """A lazy `Source` over one `.safetensors` file. Each read memory-maps just that tensor, and the map closes
    when the array (or the last view of it) is dropped: a map of the whole file would keep every page read so far
    resident, and counted in the process's memory, until the last tensor is done. A map holds an open file, so
    keep a few arrays at a time (copy those you keep), not a whole checkpoint's."""
    path = Path(path)
    header, start = read_safetensors_header(path)

    def reader(offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Callable[[], np.ndarray]:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not nbytes:
            return lambda: np.empty(shape, dtype)
        return lambda: np.asarray(np.memmap(path, np.uint8, mode="r", offset=offset, shape=(nbytes,))).view(
            dtype).reshape(shape)

    refs = {}
    for key, info in header.items():
        shape, dtype, offset = tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], start + info["data_offsets"][0]
        refs[key] = TensorRef(key, shape, dtype, str(path), reader(offset, shape, dtype), offset)
    return Source(refs, str(path))


def safetensors_folder(folder: str | os.PathLike, index_name: str = "model.safetensors.index.json") -> Source:
    """All tensors of a Hugging Face folder: sharded with an index, or one or more loose `.safetensors` files."""
    folder = Path(folder)
    index = folder / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    refs: dict[str, TensorRef] = {}
    for name in files:
        part = safetensors_file(folder / name)
        for key, ref in part.items():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{folder / name}: tensor {key!r} is not listed for this file in {index}")
            if key in refs:
                raise CheckpointError(f"{folder}: tensor {key!r} appears in both {refs[key].origin} and {name}")
            refs[key] = ref
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(refs))
        if absent:
            raise CheckpointError(f"{index} lists tensors that no shard holds: {', '.join(absent[:10])}"
                                  + (f" (+{len(absent) - 10} more)" if len(absent) > 10 else ""))
    return Source(refs, str(folder))


def torch_file(path: str | os.PathLike) -> Source:
    """A `Source` over a PyTorch `.pt`/`.bin` state dict, loaded with `weights_only=True` (no code runs) and mmap."""
    import torch  # only needed for pickled checkpoints

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")

    def reader(t) -> Callable[[], np.ndarray]:
        def read():
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        return read

    refs = {}
    for k, t in state.items():
        if not hasattr(t, "shape"):
            continue  # e.g. an integer step counter stored beside the weights
        dtype = np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else np.dtype(
            torch.empty((), dtype=t.dtype).numpy().dtype)
        refs[k] = TensorRef(k, tuple(t.shape), dtype, str(path), reader(t))
    return Source(refs, str(path))


def in_memory(arrays: Mapping[str, np.ndarray], description: str = "<memory>") -> Source:
    """A `Source` over arrays already in memory (tests, or params exported without touching disk)."""
    return Source({k: TensorRef(k, tuple(np.shape(v)), np.asarray(v).dtype, description,
                                (lambda v=v: np.asarray(v))) for k, v in arrays.items()}, description)


def open_source(path: str | os.PathLike) -> Source:
    """Opens a checkpoint by what `path` is: a folder of safetensors, a `.safetensors` file, or a `.pt`/`.bin`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if path.is_dir():
        return safetensors_folder(path)
    if path.suffix == ".safetensors":
        return safetensors_file(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return torch_file(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a folder, .safetensors, .pt or .bin)")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` to `path` as safetensors, streaming one tensor at a time (temp file, then rename)."""
    path = Path(path)
    header: dict = {}
    offset = 0
    for key, arr in tensors.items():
        dtype = np.dtype(arr.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with atomic_write(path, overwrite=True) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
            f.write(data.reshape(-1).view(np.uint8).data)  # the array's own buffer, not a copy of it
