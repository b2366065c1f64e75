"""The training metrics log: one JSON line per logged step in `metrics.jsonl`, and the line printed beside the
progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from omnidiff_jax.files import write_text


class MetricsLog:
    """Appends one JSON line per logged step; on resume, drops lines past the restored step first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def summary_line(record: dict) -> str:
    """`step=10 loss=0.5123 ...`: a record's scalar fields (per-task losses left to the JSON line)."""
    return " ".join(f"{k}={_short(v)}" for k, v in record.items() if not isinstance(v, dict))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["MetricsLog", "summary_line"]
