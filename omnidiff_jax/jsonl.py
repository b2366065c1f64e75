"""JSON Lines input (request batches, training data): one JSON object per line."""

from __future__ import annotations

import json


def parse_object(line: str, where: str, error: type[ValueError] = ValueError) -> dict:
    """`line` parsed as a JSON object; otherwise raises `error` naming `where` (e.g. "batch.jsonl:12")."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
