"""Our parameters as a self-contained orbax checkpoint folder: written atomically, restored onto any mesh.

A checkpoint folder holds

    omnidiff.json   what the folder is: format version, model config, token layout, notes (written last)
    params/         an orbax PyTree of parameter groups, e.g. {"dream": {"embed_tokens": {"embedding": ...}, ...}}
    hf/             the source checkpoint's non-weight files, verbatim: tokenizer, generation config, remote code

`writing(dst)` builds the folder in a temporary sibling of `dst` and renames it into place only when everything
is on disk, so an interrupted write never leaves a folder that looks like a checkpoint. Parameters are added a
few leaves at a time (orbax's partial saves, `orbax.checkpoint.experimental.v1.partial`), each written in the
background while the caller builds the next, so a 16 GB model is written without ever being whole in memory.
`restore` reads any subset of the leaves, each straight into its sharding (every process reads only the slices
its devices hold), in the dtype asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from omnidiff_jax.convert.keymap import flatten, unflatten
from omnidiff_jax.convert.sources import CheckpointError, read_json

META_FILE = "omnidiff.json"
PARAMS_DIR = "params"
FILES_DIR = "hf"
FORMAT = "omnidiff-orbax"
VERSION = 1
_RESTORE_BYTES = 256 << 20  # read per orbax call, bounding the host memory in transit
PENDING_BYTES = 2 << 30  # parameters queued for writing, at most (plus the caller's next tree)


def _context(partial_load: bool = False) -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False  # weights barely compress; zstd would halve the throughput
    # mid-size chunks write fast, and a sharded restore reads only the chunks its devices' slices overlap
    ctx.array.saving.storage_options.chunk_byte_size = 32 << 20
    # One file per chunk rather than OCDBT's shared data files: OCDBT holds every encoded chunk of a save in memory
    # until the save commits and only then writes, where plain zarr writes each chunk as soon as it is encoded. A
    # 2 GB save takes 1.0 s instead of 2.4 s, with half the peak memory (2 cores); a 16 GB model is ~500 files.
    ctx.array.saving.use_ocdbt = False
    ctx.memory.deepcopy_host_arrays = False  # the writer never mutates an array it has handed over
    ctx.pytree.loading.partial_load = partial_load
    return ctx


class _QuietPlainZarr(logging.Filter):
    """Drops orbax's two warnings about checkpoints without OCDBT, which ours are by design (see `_context`):
    a partial save finding no OCDBT files to merge, and a restore finding no OCDBT manifest or zarr2 `.zarray`
    (its check predates zarr3's `zarr.json`). Everything else orbax logs passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PLAIN_ZARR_WARNINGS)


_PLAIN_ZARR_WARNINGS = ("[process=%s][thread=%s] Skipping merge of OCDBT checkpoints",
                        "TensorStore data files not found in checkpoint path")
logging.getLogger("absl").addFilter(_QuietPlainZarr())


# --------------------------------------------------------------------------------------------------- writing

@contextlib.contextmanager
def staging_folder(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields an empty temporary sibling of `dst`, renamed to `dst` when the block succeeds, removed if it fails.

    An existing `dst` is refused unless `force`, and then replaced only at the very end.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} already exists; pass --force (force=True) to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(dst, "tmp")
    try:
        yield tmp
        if dst.exists():
            old = _unique_sibling(dst, "old")
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unique_sibling(path: Path, tag: str) -> Path:
    """Creates and returns an empty folder `<name>.<tag>-<random>` beside `path` (default permissions)."""
    while True:
        sibling = path.with_name(f"{path.name}.{tag}-{secrets.token_hex(4)}")
        try:
            sibling.mkdir()
            return sibling
        except FileExistsError:
            continue


class CheckpointWriter:
    """A checkpoint folder under construction (see `writing`): add parameters and files, fill `meta`.

    Parameters are written by a background thread, one `add_params` tree at a time (orbax partial saves must not
    overlap), while the caller builds the next; `make_room` keeps what is queued within `pending_bytes`.
    """

    def __init__(self, folder: Path, pending_bytes: int = PENDING_BYTES):
        self.folder = folder
        self.meta: dict = {}
        self._budget = pending_bytes
        self._queued = 0  # bytes handed to add_params and not yet written
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._trees: queue.Queue = queue.Queue()
        self._stopped = False
        (folder / FILES_DIR).mkdir()
        self._thread = threading.Thread(target=self._write_trees, name="omnidiff-checkpoint-writer", daemon=True)
        self._thread.start()

    def add_params(self, tree: Mapping, written: Callable[[], None] | None = None) -> None:
        """Queues a tree of NumPy arrays (a part of the full tree; no leaf may be saved twice) to be written in the
        background, then `written()` to be called (in the writing thread, once the writer has let go of the
        arrays). The arrays must stay unchanged until written (`wait`). An earlier write's error is raised here."""
        self._raise()
        nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
        with self._changed:
            self._queued += nbytes
        self._trees.put((tree, nbytes, written))

    def make_room(self, nbytes: int) -> None:
        """Waits until the parameters queued for writing plus `nbytes` more fit in `pending_bytes` (or nothing is
        queued), so that a caller building leaves as it goes holds a bounded amount of memory."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or not self._queued
                                   or self._queued + nbytes <= self._budget)
        self._raise()

    def add_file(self, path: Path) -> None:
        """Copies a non-weight file (tokenizer, generation config, ...) into the folder's `hf/`."""
        shutil.copy2(path, self.folder / FILES_DIR / path.name)

    def wait(self) -> None:
        """Waits until the parameters added so far are on disk; raises the first error writing them met."""
        self._raise()
        self._trees.join()
        self._raise()

    def _write_trees(self) -> None:
        while True:
            tree, nbytes, written = self._trees.get()
            try:
                if tree is None:
                    return
                if self._error is None:
                    with _context():
                        ocp.partial.save(self.folder / PARAMS_DIR, tree)
                    tree = None  # the arrays (and the files memory-mapped under them) go before `written` runs
                    if written is not None:
                        written()
            except BaseException as e:  # handed to the caller's thread by _raise
                self._error = e
            finally:
                with self._changed:
                    self._queued -= nbytes
                    self._changed.notify_all()
                self._trees.task_done()
                tree = written = None  # and before the next save starts

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise CheckpointError(f"{self.folder}: the checkpoint is already written")

    def _stop(self) -> None:
        """Ends the writing thread once it has written (or, after an error, skipped) what is queued."""
        if not self._stopped:
            self._trees.put((None, 0, None))
            self._thread.join()
            self._stopped = True

    def _abandon(self) -> None:
        if self._error is None:
            self._error = CheckpointError(f"{self.folder}: writing was abandoned")  # skips what is still queued
        self._stop()

    def _finish(self) -> None:
        self.wait()
        self._stop()
        with _context():
            ocp.partial.finalize(self.folder / PARAMS_DIR)
        meta = {"format": FORMAT, "version": VERSION, **self.meta}
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


@contextlib.contextmanager
def writing(dst: str | os.PathLike, force: bool = False,
            pending_bytes: int = PENDING_BYTES) -> Iterator[CheckpointWriter]:
    """Builds a checkpoint folder at `dst` (refused if it exists, unless `force`), atomically; at most
    `pending_bytes` of parameters wait to be written when the caller uses `make_room`.

        with writing(dst) as ckpt:
            ckpt.add_params({"dream": {...}})
            ckpt.meta["model"] = {...}
    """
    with staging_folder(dst, force) as tmp:
        writer = CheckpointWriter(tmp, pending_bytes)
        try:
            yield writer
            writer._finish()
        except BaseException:
            writer._abandon()  # no background write may outlive the folder
            raise


# --------------------------------------------------------------------------------------------------- reading

def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a folder written by `writing`."""
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    """The folder's `omnidiff.json`; raises CheckpointError naming the folder when it is not our checkpoint."""
    file = Path(path) / META_FILE
    meta = read_json(file, f"not an omnidiff orbax checkpoint (no {META_FILE})")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                              f"{FORMAT!r} version {VERSION}")
    return meta


def _metadata(path: str | os.PathLike) -> dict:
    read_meta(path)
    tree = ocp.metadata(Path(path).absolute() / PARAMS_DIR).metadata
    if not tree:
        raise CheckpointError(f"{path}: no parameters in {PARAMS_DIR}/")
    return flatten(tree)


def stored_leaves(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {"group/a/b": ShapeDtypeStruct} of every stored parameter, read from the metadata only."""
    return {k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for k, m in _metadata(path).items()}


def restore(path: str | os.PathLike, target: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array | np.ndarray]:
    """Reads the leaves named in flat `target` (any subset), each in its dtype: onto its sharding when it has
    one (each process reads only the slices its devices hold), else as a host NumPy array.

    Leaves are read about `_RESTORE_BYTES` at a time, which bounds the host memory in transit. Names and shapes
    are checked against the stored metadata first, and every problem is reported in one error.
    """
    stored = _metadata(path)
    problems = [f"{k}: not in the checkpoint" for k in target if k not in stored]
    problems += [f"{k}: stored with shape {tuple(stored[k].shape)}, expected {tuple(t.shape)}"
                 for k, t in target.items() if k in stored and tuple(stored[k].shape) != tuple(t.shape)]
    if problems:
        raise CheckpointError(f"cannot restore {path}:\n  - " + "\n  - ".join(problems))
    out: dict = {}
    chunk: dict = {}
    for n, (k, t) in enumerate(target.items()):
        # a NumPy metadata leaf asks orbax for a host array, a ShapeDtypeStruct with a sharding for a jax.Array
        chunk[k] = t if t.sharding is not None else dataclasses.replace(stored[k], dtype=np.dtype(t.dtype))
        if n + 1 == len(target) or sum(_nbytes(c) for c in chunk.values()) >= _RESTORE_BYTES:
            with _context(partial_load=len(chunk) < len(stored)):
                out.update(flatten(ocp.load(Path(path).absolute() / PARAMS_DIR, unflatten(chunk))))
            chunk = {}
    return out


def _nbytes(leaf) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
