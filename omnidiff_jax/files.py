"""Writing files atomically: a reader sees the old file or the complete new one, never a half-written one.

Every writer of the package goes through `atomic_write` (or `write_text` for small text files): the content goes
to a hidden temporary sibling (`.<name>.tmp`, in the destination's folder so the rename stays on one filesystem),
which is renamed onto the destination only when the block succeeds and removed when it fails. An interrupted
run leaves at most that one hidden file, which the next write of the same destination replaces.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the block to write; renames it onto `path` if the block succeeds,
    removes it if the block raises.

    An existing `path` is refused (FileExistsError) unless `overwrite`; a missing folder is a FileNotFoundError
    naming it. An OSError that names no file or the temporary one (a full disk, a quota, a read-only folder) is
    re-raised, of the same type, naming `path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use overwrite to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename in (None, str(tmp), tmp):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Writes `text` (UTF-8) to `path` atomically; replaces an existing file unless `overwrite` is False."""
    with atomic_write(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
