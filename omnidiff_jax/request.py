"""Generation requests: what a request may hold, checked on its own before any request runs.

A request is a JSON object (a dict in Python):

    task        one of `tasks.TASKS`
    text        the request's text (t2i description, vqa question, tts text, text prompt): a string
    image       path of an image file (vqa, svqa)
    audio       path of a speech file (asr, s2i, svqa)
    prompt_ids  (task "text" only, instead of `text`) the whole prompt as token ids, used as they are
    id          a name for the request (a string or an integer), copied to its result
    any `tasks.TaskPreset` field (`steps`, `gen_length`, `alg`, `cfg_scale`, `chat`, ...): overrides the task's preset
    seed, cfg_compat, block_size, prefix_cache, alg_temp, dual_cache, threshold, mask_schedule: options of
                `sampler.sample`

`check_request` checks the type and value of every field and returns a `Request`, or raises `RequestError` naming
the request, the field and the value. `iter_jsonl` reads a batch file of requests, one per line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Iterable

from omnidiff_jax.jsonl import parse_object
from omnidiff_jax.sampler import ALGS, MASK_SCHEDULES
from omnidiff_jax.tasks import INPUTS, OUTPUTS, PRESETS, TASKS, TaskPreset

SAMPLER_OPTIONS = ("seed", "cfg_compat", "block_size", "prefix_cache", "alg_temp", "dual_cache", "threshold",
                   "mask_schedule")


class RequestError(ValueError):
    """A request that cannot run; the message names the request and the problem."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _string(v) -> bool:
    return isinstance(v, str)


def _path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and str(v) != ""


def _flag(v) -> bool:
    return isinstance(v, bool)


FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {  # field -> (accepts the value?, what it must be)
    "id": (lambda v: _string(v) or _int(v), "a string or an integer"),
    "text": (_string, "a string"),
    "image": (_path, "a file path (a non-empty string)"),
    "audio": (_path, "a file path (a non-empty string)"),
    "prompt_ids": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(i) and i >= 0 for i in v),
                   "a non-empty list of token ids (integers >= 0)"),
    "system": (lambda v: v is None or _string(v), "a string or null"),
    "content": (_string, "a string"),
    "gen_length": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "steps": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "alg": (lambda v: v in ALGS, f"one of {', '.join(ALGS)}"),
    "repeat_penalty": (lambda v: _number(v) and v > 0, "a number > 0"),
    "max_position_penalty": (lambda v: _number(v) and v > 0, "a number > 0"),
    "cfg_scale": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "boa_prefill": (_flag, "true or false"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: v is None or (_number(v) and 0 < v <= 1), "a number in (0, 1], or null (off)"),
    "top_k": (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1, or null (off)"),
    "output": (lambda v: v in OUTPUTS, f"one of {', '.join(OUTPUTS)}"),
    "adaptive": (lambda v: v in (None, "asr", "tts"), "asr, tts or null"),
    "chat": (_flag, "true or false"),
    "seed": (lambda v: _int(v) and 0 <= v < 2 ** 63, "an integer in [0, 2^63)"),
    "cfg_compat": (_flag, "true or false"),
    "block_size": (lambda v: v is None or (_int(v) and (v >= 1 or v == -1)), "an integer >= 1, or -1 or null (one "
                   "block)"),
    "prefix_cache": (_flag, "true or false"),
    "alg_temp": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "dual_cache": (_flag, "true or false"),
    "threshold": (lambda v: v is None or (_number(v) and 0 < v < 1), "a number in (0, 1), or null (off)"),
    "mask_schedule": (lambda v: v in MASK_SCHEDULES, f"one of {', '.join(MASK_SCHEDULES)}"),
}
PRESET_FIELDS = tuple(f.name for f in dataclasses.fields(TaskPreset))
INPUT_FIELDS = ("text", "image", "audio")


@dataclasses.dataclass(frozen=True)
class Request:
    """A request that passed its checks."""

    index: int  # its position in the batch
    task: str
    preset: TaskPreset  # the task's preset with the request's overrides
    options: dict  # the sampler options it gives (SAMPLER_OPTIONS)
    id: str | int | None = None
    text: str | None = None
    image: str | os.PathLike | None = None
    audio: str | os.PathLike | None = None
    prompt_ids: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        """How messages name it: "request 3 (tts)"."""
        return request_name(self.index, self.task)


def request_name(index: int, task) -> str:
    """How messages name the request at position `index`: "request 3 (tts)"."""
    return f"request {index} ({task})"


def check_request(request, index: int) -> Request:
    """The request at position `index` checked field by field; raises RequestError at the first problem."""
    if not isinstance(request, dict):
        raise RequestError(f"request {index}: expected an object (a dict), got {type(request).__name__}")
    task = request.get("task")
    if task not in TASKS:
        raise RequestError(f"request {index}: unknown task {task!r}; expected one of {TASKS}")
    where = request_name(index, task)
    unknown = sorted(set(request) - set(FIELDS) - {"task"})
    if unknown:
        raise RequestError(f"{where}: unknown field(s) {unknown}")
    # null means "not given", except for the fields where it is a value (top_p: null turns the filter off)
    request = {k: v for k, v in request.items() if k == "task" or v is not None or FIELDS[k][0](None)}
    for field, value in request.items():
        if field in FIELDS:
            accepts, what = FIELDS[field]
            if not accepts(value):
                raise RequestError(f"{where}: {field!r} must be {what}, got {_show(value)}")
    needs = INPUTS[task]
    if "prompt_ids" in request:
        if task != "text":
            raise RequestError(f"{where}: 'prompt_ids' is for task 'text' only")
        if "text" in request:
            raise RequestError(f"{where}: give 'text' or 'prompt_ids', not both")
        needs = ()
    for field in INPUT_FIELDS:
        if field in request and field not in INPUTS[task]:
            raise RequestError(f"{where}: the task takes no {field!r} (its inputs: {', '.join(INPUTS[task])})")
    for field in needs:
        if request.get(field) in (None, ""):
            raise RequestError(f"{where}: needs {field!r}" + (" (or 'prompt_ids')" if task == "text" else ""))
    preset = dataclasses.replace(PRESETS[task], **{k: v for k, v in request.items() if k in PRESET_FIELDS})
    prompt_ids = request.get("prompt_ids")
    return Request(index, task, preset, {k: request[k] for k in SAMPLER_OPTIONS if k in request}, request.get("id"),
                   request.get("text"), request.get("image"), request.get("audio"),
                   None if prompt_ids is None else tuple(prompt_ids))


def iter_jsonl(path: str | os.PathLike) -> Iterable[dict]:
    """Requests from a JSONL batch file (UTF-8), one JSON object per line (blank lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield parse_object(line, f"{path}:{n}", RequestError)


def _show(value) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"
