"""The training metrics log: one JSON line per logged step in `metrics.jsonl`, TensorBoard event files beside it
(the same scalars: loss, per-task loss, lr, grad norm, tokens/s, MFU, ...), the line printed beside the progress
bar, and profiler traces of chosen steps.

    tensorboard --logdir runs/          # every run folder's curves
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

from omnidiff_jax.files import write_text


class MetricsLog:
    """Appends one JSON line per logged step, and its numbers as TensorBoard scalars (per-task losses as
    `task_loss/<task>`) in event files in the same folder; on resume, drops lines past the restored step first
    and tells TensorBoard to discard the events past it. Written by process 0 only."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.events = None
        if jax.process_index() > 0:
            return
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))
        self.events = SummaryWriter(str(path.parent), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if self.events is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in _scalars(record):
            self.events.add_scalar(name, value, record["step"])
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def _scalars(record: dict, prefix: str = ""):
    """(tag, number) for every number of a record but its step, nested dicts as `key/inner`."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and key != "step":
            yield prefix + key, value


class Profile:
    """A `jax.profiler` trace of the updates with index START <= i < STOP (the log's steps START+1..STOP) into
    `folder` (open it with TensorBoard's profile plugin, or Perfetto): `before(i)` and `after(i)` around update i,
    `after` once the update's results are on the host."""

    def __init__(self, folder: Path, window: tuple[int, int] | None):
        self.folder, self.window, self.tracing = folder, window, False
        if window is not None and not 0 <= window[0] < window[1]:
            raise ValueError(f"profile window START:STOP needs 0 <= START < STOP, got {window[0]}:{window[1]}")

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0]:
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True

    def after(self, step: int) -> None:
        if self.tracing and step + 1 == self.window[1]:
            self.close()

    def close(self) -> None:
        """Ends the trace if one is running (a run that stops inside the window)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def summary_line(record: dict) -> str:
    """`step=10 loss=0.5123 ...`: a record's scalar fields (per-task losses left to the JSON line)."""
    return " ".join(f"{k}={_short(v)}" for k, v in record.items() if not isinstance(v, dict))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["MetricsLog", "Profile", "summary_line"]
