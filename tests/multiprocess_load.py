"""Run by tests/test_multiprocess.py under scripts/launch_local.py: each process loads a Hugging Face (safetensors)
folder and an orbax folder of the same model onto a mesh that spans the processes, and writes what it read.

    python tests/multiprocess_load.py FOLDER OUT_JSON DATA,FSDP,TENSOR

Bytes read are the kernel's per-process counters in /proc/self/io: `read_bytes` (bytes this process caused to
be fetched from storage, after the folder's pages were dropped from the page cache) for the memory-mapped
safetensors files, and `rchar` (bytes returned by read calls, cached or not) for orbax, which reads its chunks
with pread. The safetensors loads run one process at a time, so that pages one process faulted in are not
counted as the other's; orbax's restore runs in every process at once.
"""

import json
import os
import sys
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from omnidiff_jax import distributed, load_model
from omnidiff_jax.sharding import make_mesh


def io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def drop_from_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def held_bytes(params) -> int:
    """Bytes of the parameter slices this process's devices hold (each distinct slice once)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        seen = {tuple((s.start, s.stop) for s in shard.index): shard.data.nbytes for shard in leaf.addressable_shards}
        total += sum(seen.values())
    return total


def main(folder: str, out: str, mesh_sizes: str) -> None:
    distributed.initialize()
    mesh = make_mesh(*(int(s) for s in mesh_sizes.split(",")))
    me = jax.process_index()
    report = {}
    for kind, counter, one_at_a_time in (("hf", "read_bytes", True), ("orbax", "rchar", False)):
        path = Path(folder) / kind
        for turn in range(jax.process_count() if one_at_a_time else 1):
            if not one_at_a_time or turn == me:
                drop_from_cache(path)
                before = io_counters()
                model = load_model(path, mesh=mesh)
                jax.block_until_ready(model.params)
                read = io_counters()[counter] - before[counter]
                report[kind] = {"read": read, "counter": counter, "held": held_bytes(model.params),
                                "folder": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())}
            multihost_utils.sync_global_devices(f"{kind} {turn}")
    Path(f"{out}.{me}").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
