"""Our parameters as a self-contained orbax checkpoint folder: written atomically, restored onto any mesh.

A checkpoint folder holds

    omnidiff.json   what the folder is: format version, model config, token layout, notes, and a CRC-32 of every
                    parameter leaf's bytes (written last)
    params/         an orbax PyTree of parameter groups, e.g. {"dream": {"embed_tokens": {"embedding": ...}, ...}}
    hf/             the source checkpoint's non-weight files, verbatim: tokenizer, generation config, remote code

`writing(dst)` builds the folder in a temporary sibling of `dst` and renames it into place only when everything
is on disk, so an interrupted write (an exception, Ctrl-C, SIGTERM) never leaves a folder that looks like a
checkpoint, and removes the staging folder; one left by a killed process is removed by the next write to `dst`.
Parameters are added a few leaves at a time (orbax's partial saves, `orbax.checkpoint.experimental.v1.partial`),
each written in the background while the caller builds the next, so a 16 GB model is written without ever being
whole in memory, in chunks cut along the axes meshes split (`CheckpointWriter`). `restore` reads any subset of
the leaves, each straight into its sharding (every process reads only the chunks its devices' slices overlap),
in the dtype asked for; `verify` reads every leaf back and checks it against its checksum. A
damaged folder (a file missing, truncated or corrupt) is a `CheckpointError` of one line naming the folder and
what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from omnidiff_jax.convert.keymap import flatten, unflatten
from omnidiff_jax.convert.sources import CheckpointError, read_json

META_FILE = "omnidiff.json"
PARAMS_DIR = "params"
_TREE_DIR = "state"  # orbax's folder for the PyTree under params/: _METADATA, then one zarr array per leaf
FILES_DIR = "hf"
FORMAT = "omnidiff-orbax"
VERSION = 1
CHECKSUMS = "checksums"  # the omnidiff.json entry: {leaf path: "crc32:<8 hex digits>"}
_RESTORE_BYTES = 256 << 20  # read per orbax call, bounding the host memory in transit
PENDING_BYTES = 2 << 30  # parameters queued for writing, at most (plus the caller's next tree)
# The largest stored chunk (one file each): as fast to write and read as 32 MB chunks (1 GB written in 1.8 s vs
# 2.1 s, read in 2.2 s vs 2.1 s), and fine enough for a process to read little more than its slices: Dream-7B with
# fsdp 2 / 4 / 8 across processes, 50 / 29 / 19 % of the folder per process for 50 / 25 / 12.5 % held (36 / 35 %
# at fsdp 4 / 8 with 32 MB chunks); with tensor 2 / 4, 50 / 25 % (with the heads one per chunk, `CheckpointWriter`).
CHUNK_BYTES = 8 << 20


def _context(partial_load: bool = False, chunk_axes: Mapping[str, tuple[int, ...]] | None = None) -> ocp.Context:
    """Our orbax settings. chunk_axes: {leaf path: axes} stored one index per chunk (see `CheckpointWriter`)."""
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False  # weights barely compress; zstd would halve the throughput
    # Mid-size chunks write fast, and a sharded restore reads only the chunks its devices' slices overlap. To fit
    # a leaf in CHUNK_BYTES orbax cuts its longest axis (to its next smaller divisor, repeatedly); the axes in
    # `chunk_axes` (its `shard_axes`) it cuts to one index per chunk first.
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    if chunk_axes:
        def storage(keypath, value) -> ocp.options.ArrayOptions.Saving.StorageOptions | None:
            axes = chunk_axes.get("/".join(str(k.key) for k in keypath))
            return None if axes is None else ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=axes)
        ctx.array.saving.scoped_storage_options_creator = storage
    # One file per chunk rather than OCDBT's shared data files: OCDBT holds every encoded chunk of a save in memory
    # until the save commits and only then writes, where plain zarr writes each chunk as soon as it is encoded. A
    # 2 GB save takes 1.0 s instead of 2.4 s, with half the peak memory (2 cores); a 16 GB model is ~2000 files.
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
    _remove_leftovers(dst)
    tmp = _unique_sibling(dst, "tmp")
    try:
        with _sigterm_raises():
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
    """Creates and returns an empty folder `<name>.<tag>-<host>-<pid>-<random>` beside `path` (default
    permissions)."""
    while True:
        sibling = path.with_name(f"{path.name}.{tag}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            sibling.mkdir()
            return sibling
        except FileExistsError:
            continue


def _remove_leftovers(dst: Path) -> None:
    """Removes the staging folders `<dst>.tmp-<host>-<pid>-*` that writers on this host left when they were killed
    (SIGKILL, or the machine went down); a live writer's folder, or another host's, is left alone."""
    mine = re.compile(rf"{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]+")
    for leftover in dst.parent.glob(f"{glob.escape(dst.name)}.tmp-*"):
        match = mine.fullmatch(leftover.name[len(dst.name) + len(".tmp-"):])
        if match and not _running(int(match.group(1))) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) in the main thread as Ctrl-C raises KeyboardInterrupt, so
    that the same clean-up runs (a no-op outside the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CheckpointWriter:
    """A checkpoint folder under construction (see `writing`): add parameters and files, fill `meta`.

    Parameters are written by a background thread, one `add_params` tree at a time (orbax partial saves must not
    overlap), while the caller builds the next; `make_room` keeps what is queued within `pending_bytes`. Each leaf
    is stored in chunks of at most `CHUNK_BYTES`, one index per chunk along the axes `chunk_axes` gives for its
    path ("group/a/b"): a restore reads whole chunks, so an axis that meshes split into few slices (attention
    heads) is stored that way for each process to read only its own.
    """

    def __init__(self, folder: Path, pending_bytes: int = PENDING_BYTES,
                 chunk_axes: Mapping[str, tuple[int, ...]] | None = None):
        self.folder = folder
        self._chunk_axes = chunk_axes
        self.meta: dict = {}
        self._checksums: dict[str, str] = {}  # leaf path -> checksum of its bytes, as written
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
                    with _context(chunk_axes=self._chunk_axes):
                        ocp.partial.save(self.folder / PARAMS_DIR, tree)
                    self._checksums.update({path: checksum(leaf) for path, leaf in flatten(tree).items()})
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
        meta = {"format": FORMAT, "version": VERSION, **self.meta, CHECKSUMS: dict(sorted(self._checksums.items()))}
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


@contextlib.contextmanager
def writing(dst: str | os.PathLike, force: bool = False, pending_bytes: int = PENDING_BYTES,
            chunk_axes: Mapping[str, tuple[int, ...]] | None = None) -> Iterator[CheckpointWriter]:
    """Builds a checkpoint folder at `dst` (refused if it exists, unless `force`), atomically; at most
    `pending_bytes` of parameters wait to be written when the caller uses `make_room`; `chunk_axes` as for
    `CheckpointWriter`.

        with writing(dst) as ckpt:
            ckpt.add_params({"dream": {...}})
            ckpt.meta["model"] = {...}
    """
    with staging_folder(dst, force) as tmp:
        writer = CheckpointWriter(tmp, pending_bytes, chunk_axes)
        try:
            yield writer
            writer._finish()
        except BaseException:
            writer._abandon()  # no background write may outlive the folder
            raise


def checksum(array) -> str:
    """CRC-32 of an array's bytes in C order (`crc32:<8 hex digits>`): a flipped or lost byte changes it."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return f"crc32:{zlib.crc32(data):08x}"


# --------------------------------------------------------------------------------------------------- reading

def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a folder written by `writing` (or what is left of one: `read_meta` says what is wrong)."""
    return (Path(path) / META_FILE).is_file() or (Path(path) / PARAMS_DIR).is_dir()


def read_meta(path: str | os.PathLike) -> dict:
    """The folder's `omnidiff.json`; raises CheckpointError naming the folder when it is not our checkpoint."""
    file = Path(path) / META_FILE
    meta = read_json(file, f"not an omnidiff orbax checkpoint (no {META_FILE})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise CheckpointError(f"{file}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} version "
                              f"{VERSION}")
    return meta


def _stored_paths(path: Path) -> list[str]:
    """The leaf paths the folder's PyTree index lists, after checking that each leaf's array metadata is there."""
    tree = path / PARAMS_DIR / _TREE_DIR
    index = tree / "_METADATA"
    if not index.is_file():
        raise CheckpointError(f"{path}: damaged checkpoint: {index.relative_to(path)} is missing")
    try:
        entries = json.loads(index.read_text())["tree_metadata"].values()
        keys = [[k["key"] for k in entry["key_metadata"]] for entry in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint: {index.relative_to(path)} is not an orbax PyTree index "
                              f"({type(e).__name__}: {e})") from None
    if not keys:
        raise CheckpointError(f"{path}: no parameters in {PARAMS_DIR}/")
    for leaf in keys:
        array = tree / ".".join(map(str, leaf)) / "zarr.json"
        if not array.is_file():
            raise CheckpointError(f"{path}: damaged checkpoint: parameter {'/'.join(map(str, leaf))} has no array "
                                  f"metadata ({array.relative_to(path)} is missing)")
    return ["/".join(map(str, leaf)) for leaf in keys]


def _metadata(path: str | os.PathLike) -> dict:
    path = Path(path).absolute()
    read_meta(path)
    _stored_paths(path)
    try:
        tree = ocp.metadata(path / PARAMS_DIR).metadata
    except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types for damaged files
        raise _damaged(path, e) from None
    if not tree:
        raise CheckpointError(f"{path}: damaged checkpoint: orbax finds no parameters in {PARAMS_DIR}/")
    return flatten(tree)


def _damaged(path: Path, error: BaseException) -> CheckpointError:
    """One line for a read that failed inside orbax/TensorStore: the parameter and file at fault, and why."""
    causes = [error]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    cause = next((c for c in causes if 'local file "' in str(c)), causes[-1])
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    reason = reason.replace(f"{path}/", "")
    file = re.search(r'local file "([^"]+)"', reason)
    leaf = ""
    if file is not None:
        parts = Path(file.group(1)).parts
        if len(parts) > 2 and parts[:2] == (PARAMS_DIR, _TREE_DIR):
            leaf = f" parameter {parts[2].replace('.', '/')}:"
    return CheckpointError(f"{path}: damaged checkpoint:{leaf} {reason}")


def stored_leaves(path: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {"group/a/b": ShapeDtypeStruct} of every stored parameter, read from the metadata only."""
    return {k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for k, m in _metadata(path).items()}


def restore(path: str | os.PathLike, target: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array | np.ndarray]:
    """Reads the leaves named in flat `target` (any subset), each in its dtype: onto its sharding when it has
    one (each process reads only the slices its devices hold), else as a host NumPy array.

    Leaves are read about `_RESTORE_BYTES` at a time, which bounds the host memory in transit. Names and shapes
    are checked against the stored metadata first, and every problem is reported in one error.
    """
    return dict(_restore_chunks(path, target))


def _restore_chunks(path: str | os.PathLike, target: Mapping[str, jax.ShapeDtypeStruct],
                    stored: dict | None = None) -> Iterator[tuple[str, object]]:
    """`restore`, yielding (path, leaf) as each chunk of about `_RESTORE_BYTES` is read. stored: the folder's
    metadata when already read."""
    path = Path(path).absolute()
    stored = _metadata(path) if stored is None else stored
    problems = [f"{k}: not in the checkpoint" for k in target if k not in stored]
    problems += [f"{k}: stored with shape {tuple(stored[k].shape)}, expected {tuple(t.shape)}"
                 for k, t in target.items() if k in stored and tuple(stored[k].shape) != tuple(t.shape)]
    if problems:
        raise CheckpointError(f"cannot restore {path}:\n  - " + "\n  - ".join(problems))
    chunk: dict = {}
    for n, (k, t) in enumerate(target.items()):
        # a NumPy metadata leaf asks orbax for a host array, a ShapeDtypeStruct with a sharding for a jax.Array
        chunk[k] = t if t.sharding is not None else dataclasses.replace(stored[k], dtype=np.dtype(t.dtype))
        if n + 1 == len(target) or sum(_nbytes(c) for c in chunk.values()) >= _RESTORE_BYTES:
            loaded = _load(path, chunk, partial=len(chunk) < len(stored))
            chunk = {}
            yield from loaded.items()


def _load(path: Path, chunk: dict, partial: bool) -> dict:
    """One orbax read of the flat `chunk`; a damaged file raises `_damaged`'s one line, and nothing else reaches
    stderr (`_AbandonedReads`, installed before the read: TensorStore's threads may complete the other reads of a
    failed call before orbax's error reaches this function)."""
    if not isinstance(sys.unraisablehook, _AbandonedReads):
        sys.unraisablehook = _AbandonedReads(sys.unraisablehook)
    if not isinstance(sys.excepthook, _AbandonedReads):
        sys.excepthook = _AbandonedReads(sys.excepthook)
    try:
        with _context(partial_load=partial):
            return flatten(ocp.load(path / PARAMS_DIR, unflatten(chunk)))
    except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types for damaged files
        failure = _damaged(path, e)
    gc.collect()  # the failed call's other reads, left in its closed event loop, are closed here
    raise failure


class _AbandonedReads:
    """An unraisable-exception hook and excepthook that drop what a failed orbax read leaves behind: its other
    reads, abandoned in a closed event loop, raise when they are closed ("Encountered error while reading array
    index") and when TensorStore's threads complete them later ("Event loop is closed"), errors Python can only
    print, as tracebacks of up to a thousand lines. Every other error goes to the previous hook."""

    def __init__(self, previous: Callable):
        self.previous = previous

    def __call__(self, *args) -> None:
        error = args[0].exc_value if len(args) == 1 else args[1]  # unraisablehook(info) or excepthook(type, value, tb)
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                or str(error).startswith("Encountered error while reading array index")):
            self.previous(*args)


def verify(path: str | os.PathLike) -> list[str]:
    """Reads every stored leaf back and checks it against the checksum the writer recorded; returns one line per
    problem (a damaged file, a leaf whose bytes changed, one missing or unlisted), [] when the folder is intact.
    A folder written before checksums were recorded is still read through, for damaged files."""
    path = Path(path).absolute()
    listed = read_meta(path).get(CHECKSUMS)
    problems = []
    if not isinstance(listed, dict):
        problems.append(f"{path / META_FILE}: no {CHECKSUMS!r} entry (written before checksums were recorded): "
                        "its leaves are read but not compared; import the checkpoint again to record them")
    try:
        stored = _metadata(path)
    except CheckpointError as e:
        return problems + [str(e)]
    if isinstance(listed, dict):
        problems += [f"{path}: parameter {k}: listed in {META_FILE} but not stored" for k in listed if k not in stored]
        problems += [f"{path}: parameter {k}: stored but has no checksum in {META_FILE}" for k in stored
                     if k not in listed]
    def check(k: str, leaf) -> None:
        if isinstance(listed, dict) and k in listed and (found := checksum(leaf)) != listed[k]:
            problems.append(f"{path}: parameter {k}: checksum {found} does not match the recorded {listed[k]}: "
                            "its data changed on disk")

    target = {k: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for k, m in stored.items()}
    unread = dict(target)
    try:
        for k, leaf in _restore_chunks(path, target, stored):
            check(k, leaf)
            del unread[k]
    except CheckpointError:  # a damaged file: the leaves not yet checked are read one by one, to name each one
        for k, t in unread.items():
            try:
                (_, leaf), = _restore_chunks(path, {k: t}, stored)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            check(k, leaf)
    return problems


def _nbytes(leaf) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
