"""Shared helpers for the benchmark scripts: timing, machine facts, and the table + JSON report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from omnidiff_jax.files import write_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the PyTorch references live in tests/torch_ref
DATA = REPO / "tests" / "data"  # the reference's images and speech (tests/data/README.md)


def timeit(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, min_seconds: float = 0.0) -> float:
    """Median seconds per call of `fn` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    import jax
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()]}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def report(name: str, rows: list[dict], columns: list[str], path: str | None) -> None:
    """Prints rows as an aligned table and writes {machine, rows} as JSON to `path` (temp file + rename)."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(f"\n{name}")
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=2))
        print(f"wrote {out}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
