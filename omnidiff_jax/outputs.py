"""Writing generation results as each finishes: its image and speech files, and one JSON line.

    with ResultWriter.folder("outputs", force=False) as writer:   # PNG/WAV files + outputs/manifest.jsonl
        for index, result in pipe.stream(requests):
            record = writer.write(index, result)

A result's image (PNG) and speech (22.05 kHz WAV, or the result's rate) are written atomically
(`files.atomic_write`) as `{index:04d}[-{id}].png|.wav`, then its record, the result without the arrays plus
`index` and the file names, as one JSON line that is flushed at once: a crash or kill loses only the requests
not finished yet. Lines are written in the order results finish; when the writer closes without an error, a
lines file is rewritten (atomically) in request order.

All of `omnidiff generate`'s writing happens here.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from omnidiff_jax.audio_io import write_wav
from omnidiff_jax.files import write_text
from omnidiff_jax.image import write_png

MANIFEST = "manifest.jsonl"


class ResultWriter:
    """Writes records as JSON lines to `path` (None: stdout) and media files into `media` (None: not written)."""

    def __init__(self, path: Path | None, media: Path | None):
        self.path, self.media = path, media
        self.lines: dict[int, str] = {}  # index -> its JSON line
        self.failed = 0
        self._file: TextIO = sys.stdout
        if path is not None:
            try:
                self._file = open(path, "w", encoding="utf-8")
            except OSError as e:
                raise OSError(e.errno, f"cannot write: {e.strerror}", str(path)) from None

    @classmethod
    def folder(cls, out: str | os.PathLike, force: bool = False) -> "ResultWriter":
        """Media files and `manifest.jsonl` in the folder `out` (created if missing; a non-empty one only with
        `force`)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out))
        if out.is_dir() and any(out.iterdir()) and not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to write into it")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the output folder: {e.strerror}", str(out)) from None
        return cls(out / MANIFEST, out)

    @classmethod
    def lines_to(cls, path: str | os.PathLike | None, force: bool = False) -> "ResultWriter":
        """Records only (no media files), to the file `path` (an existing one only with `force`) or stdout."""
        if path is None:
            return cls(None, None)
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
        if not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the folder does not exist", str(path.parent))
        return cls(path, None)

    @classmethod
    def discard(cls) -> "ResultWriter":
        """Records built (and failures counted) but nothing written: the other processes of a multi-process
        run, whose results process 0 writes."""
        writer = cls(None, None)
        writer._file = io.StringIO()
        return writer

    def write(self, index: int, result: dict) -> dict:
        """Writes the result of request `index`; returns its record (what its JSON line holds)."""
        record = {"index": index, **{k: v for k, v in result.items() if k not in ("image", "wav")},
                  "image": None, "wav": None}
        record["warnings"] = list(result["warnings"])
        stem = f"{index:04d}" + _id_suffix(result.get("id"))
        for kind, suffix in (("image", ".png"), ("wav", ".wav")):
            if result.get(kind) is None:
                continue
            if self.media is None:
                record["warnings"].append(f"{kind} not written: no output folder")
            elif kind == "image":
                write_png(self.media / f"{stem}{suffix}", result["image"], overwrite=True)
                record["image"] = f"{stem}{suffix}"
            else:
                write_wav(self.media / f"{stem}{suffix}", result["wav"], result["sample_rate"])
                record["wav"] = f"{stem}{suffix}"
        line = json.dumps(record, ensure_ascii=False)
        try:
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot write: {e.strerror}", str(self.path or "stdout")) from None
        self.lines[index] = line
        self.failed += record["error"] is not None
        return record

    def close(self, complete: bool = True) -> None:
        """Closes the lines file; if `complete`, rewrites it in request order. After an error (`complete` False)
        the lines written so far stay as they are."""
        if self.path is None:
            return
        try:
            self._file.close()
        except OSError:
            if complete:
                raise
            return  # the error being raised already says why (e.g. a full disk)
        if complete:
            write_text(self.path, "".join(self.lines[i] + "\n" for i in sorted(self.lines)))

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(complete=error_type is None)


def _id_suffix(request_id) -> str:
    if request_id in (None, ""):
        return ""
    text = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(request_id))
    return f"-{text[:40]}"
