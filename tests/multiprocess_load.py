"""Run by tests/test_multiprocess.py under scripts/launch_local.py: each process loads a Hugging Face (safetensors)
folder and an orbax folder of the same model onto a mesh that spans the processes, and writes what it read.

    python tests/multiprocess_load.py FOLDER OUT_JSON DATA,FSDP,TENSOR

Bytes read are the kernel's per-process counter `rchar` in /proc/self/io: bytes returned to this process by read
calls, whether the page cache held them or not. Both readers read with pread (orbax its chunk files, ours the
safetensors byte ranges of each slice), so it counts what each process asks of the folder, whoever ran first; a
reader that touched a memory map instead would count nothing, which the test's lower bound (the bytes held)
catches.
"""

import json
import sys
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from omnidiff_jax import distributed, load_model
from omnidiff_jax.sharding import make_mesh


def io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


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
    report = {}
    for kind in ("hf", "orbax"):
        path = Path(folder) / kind
        before = io_counters()["rchar"]
        model = load_model(path, mesh=mesh)
        jax.block_until_ready(model.params)
        report[kind] = {"read": io_counters()["rchar"] - before, "held": held_bytes(model.params),
                        "folder": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())}
        multihost_utils.sync_global_devices(kind)
    Path(f"{out}.{jax.process_index()}").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
