"""Benchmark: checkpoint conversion at scale. A synthetic bf16 checkpoint in the released model's key layout (real
widths, fewer layers, every speech-input key; >= 1.5B parameters, several safetensors shards) is imported to orbax
and exported back; each phase runs in its own process and reports wall time (from after its Python modules are
loaded), peak RSS (VmHWM) and throughput beside the raw read speed of the same files. Goals: import peak RSS <=
1.5 x the largest shard + 1 GB; import throughput >= 50% of the raw read speed. Files are deleted.

Every run starts from the same state: earlier writes synced, every file of the benchmark out of the page cache,
its input read once just before being dropped. So each phase reads its input from below the page cache, and the
caches there (on a VM, the host's) hold it alike for every phase; otherwise a phase run after others that wrote
gigabytes reads slower than one run first (on our 2-core VM, the raw read takes 5 s right after an import, 2.6 s
after another read). The phases run in rounds, each once per round, and each reports its median run.

`copy` is a reference for what writing the bytes durably costs, as the import does (orbax syncs each file it
writes), with no conversion at all: the kernel copies each source file (sendfile) and syncs it, one file after
another.

    python scripts/bench_convert.py [--layers 2] [--shard-gb 2] [--repeat 3] [--workdir /tmp]
        [--json out/bench_convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import benchlib
import ml_dtypes
import numpy as np

from omnidiff_jax.convert.sources import write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
H, HEADS, KV, FF, VOCAB = 3584, 28, 4, 18944, 176264  # Omni-Diffusion `config_dream_resume.json`


def reference_keys(layers: int) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the released checkpoint (Dream `modeling_dream.py` names), with `layers` LLM layers."""
    kv = H // HEADS * KV
    keys = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,), "lm_head.weight": (VOCAB, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                     p + "self_attn.q_proj.weight": (H, H), p + "self_attn.q_proj.bias": (H,),
                     p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
                     p + "self_attn.o_proj.weight": (H, H), p + "mlp.gate_proj.weight": (FF, H),
                     p + "mlp.up_proj.weight": (FF, H), p + "mlp.down_proj.weight": (H, FF)})
    p = "model.audio_projection."
    keys.update({p + "pre_proj_layernorm.weight": (512,), p + "pre_proj_layernorm.bias": (512,),
                 p + "mlp.0.weight": (H, 512), p + "mlp.2.weight": (H, H)})
    p = "model.audio_model.model."
    keys.update({p + "embed.weight": (16, 560), p + "ctc.ctc_lo.weight": (25055, 512), p + "ctc.ctc_lo.bias": (25055,)})
    for norm in ("after_norm", "tp_norm"):
        keys.update({f"{p}encoder.{norm}.weight": (512,), f"{p}encoder.{norm}.bias": (512,)})
    blocks = [("encoders0.0", 560)] + [(f"encoders.{i}", 512) for i in range(49)] + \
             [(f"tp_encoders.{i}", 512) for i in range(20)]
    for name, width in blocks:
        b = f"{p}encoder.{name}."
        keys.update({b + "self_attn.linear_q_k_v.weight": (1536, width), b + "self_attn.linear_q_k_v.bias": (1536,),
                     b + "self_attn.linear_out.weight": (512, 512), b + "self_attn.linear_out.bias": (512,),
                     b + "self_attn.fsmn_block.weight": (512, 1, 11), b + "feed_forward.w_1.weight": (2048, 512),
                     b + "feed_forward.w_1.bias": (2048,), b + "feed_forward.w_2.weight": (512, 2048),
                     b + "feed_forward.w_2.bias": (512,), b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                     b + "norm2.weight": (512,), b + "norm2.bias": (512,)})
    return keys


class _Random:
    """A bf16 tensor of random bits, made only when `write_safetensors` asks for its data."""

    def __init__(self, shape, seed):
        self.shape, self.dtype, self.seed = shape, BF16, seed

    def __array__(self, dtype=None, copy=None):
        n = int(np.prod(self.shape))
        return np.frombuffer(np.random.default_rng(self.seed).bytes(2 * n), np.uint16).view(BF16).reshape(self.shape)


def generate(folder: Path, layers: int, shard_bytes: int) -> None:
    """Writes config.json, tokenizer_config.json and shards <= shard_bytes with an index, streaming."""
    from omnidiff_jax.convert.dream import hf_config
    from omnidiff_jax.models.dream import DreamConfig
    from omnidiff_jax.vocab import TokenLayout
    folder.mkdir(parents=True)
    cfg = DreamConfig(VOCAB, H, layers, HEADS, KV, FF, dtype="bfloat16", param_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, TokenLayout(), "bfloat16")))
    (folder / "tokenizer_config.json").write_text("{}")
    shards, size = [[]], 0
    for key, shape in reference_keys(layers).items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, {k: _Random(s, zlib.crc32(k.encode())) for k, s in shard}, {"format": "pt"})
        weight_map.update({k: name for k, _ in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_cache(folder: Path, read_first: Path | None = None) -> None:
    """Flushes and evicts `folder`'s files from the page cache, so the next phase reads them from below it; the
    files under `read_first` are read once before (see the module docstring)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                if read_first is not None and path.is_relative_to(read_first):
                    while os.read(fd, 64 << 20):
                        pass
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def phase(name: str, src: str, dst: str) -> dict:
    """Runs one phase in this process; returns seconds, bytes and peak RSS. The clock starts once the phase's
    modules are imported (interpreter start-up is not throughput)."""
    import jax
    from omnidiff_jax.checkpoint import export_checkpoint, import_checkpoint, load_model
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if name == "raw_read":
        nbytes, buf = 0, bytearray(64 << 20)
        for path in sorted(Path(src).glob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    nbytes += n
    elif name == "copy":
        Path(dst).mkdir()
        nbytes = sum(_copy_and_sync(path, Path(dst) / path.name) for path in sorted(Path(src).glob("*.safetensors")))
    elif name == "import":
        nbytes = import_checkpoint(src, dst).nbytes
    elif name == "export":
        nbytes = export_checkpoint(src, dst).nbytes
    elif name in ("load_orbax", "load_direct"):  # the whole model into device (here: CPU) memory
        model = load_model(src)  # an orbax folder (load_orbax) or the reference folder (load_direct)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(jax.block_until_ready(model.params)))
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
    return {"seconds": seconds, "bytes": nbytes, "peak_rss_bytes": hwm, "cpu_seconds": _cpu_seconds() - cpu_start}


def _copy_and_sync(src: Path, dst: Path) -> int:
    """Copies a file in the kernel (sendfile: always a copy, never a clone) and syncs it; returns its size."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size, done = os.fstat(fin.fileno()).st_size, 0
        while done < size:
            done += os.sendfile(fout.fileno(), fin.fileno(), done, size - done)
        os.fsync(fout.fileno())
    return size


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_phase(name: str, src: Path, dst: Path | None = None) -> dict:
    """Runs a phase once, in a fresh process started as the module docstring says (`dst`, if any, is replaced).
    `src` lies in the benchmark's folder."""
    if dst is not None:
        shutil.rmtree(dst, ignore_errors=True)
    drop_cache(src.parent, read_first=src)
    out = subprocess.run([sys.executable, __file__, "--phase", name, str(src), str(dst or "")],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"phase {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_rounds(phases: list[tuple[str, Path, Path | None]], repeat: int) -> dict[str, dict]:
    """Runs every phase once per round, `repeat` rounds, so that each phase's runs fall in the same stretches of
    time as the others' (this VM's disk and memory speeds drift by tens of percent over minutes). Returns, per
    phase, the run with the median time and every run's seconds under "runs"."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in phases}
    for _ in range(repeat):
        for name, src, dst in phases:
            runs[name].append(run_phase(name, src, dst))
    median = {name: sorted(r, key=lambda run: run["seconds"])[(len(r) - 1) // 2] for name, r in runs.items()}
    return {name: {**median[name], "runs": [run["seconds"] for run in r]} for name, r in runs.items()}


def verify(src: Path, back: Path) -> int:
    """Counts the exported tensors, checking each is bit-identical to the source."""
    from omnidiff_jax.convert.sources import safetensors_folder
    a, b = safetensors_folder(src), safetensors_folder(back)
    for key in b:
        if not np.array_equal(a[key].read().view(np.uint8), b[key].read().view(np.uint8)):
            raise SystemExit(f"round trip changed {key}")
    return len(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="LLM layers at the real width (2 -> 1.98B parameters)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest source shard, GB")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of all phases; each phase's median run is "
                    "reported (this VM's page-cache and first-touch costs vary by tens of percent between runs)")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--json", default="out/bench_convert.json")
    ap.add_argument("--phase", nargs=3, metavar=("NAME", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(*args.phase)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir))
    src, ox, back, copy = work / "hf", work / "orbax", work / "hf_back", work / "copy"
    try:
        start = time.perf_counter()
        generate(src, args.layers, int(args.shard_gb * 1e9))
        shards = sorted(src.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        params = sum(int(np.prod(s)) for s in reference_keys(args.layers).values())
        print(f"generated {params / 1e9:.2f}B parameters in {len(shards)} shards (largest {largest / 1e9:.2f} GB) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        phases = [("raw_read", src, None), ("copy", src, copy), ("import", src, ox), ("export", ox, back),
                  ("load_orbax", ox, None), ("load_direct", src, None)]
        results = run_rounds(phases, args.repeat)
        tensors = verify(src, back)
        print(f"round trip: {tensors} exported tensors bit-identical to the source", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speed = {name: r["bytes"] / r["seconds"] for name, r in results.items()}
    rows = [{"phase": name, "seconds": r["seconds"], "GB": r["bytes"] / 1e9, "GB_per_s": speed[name] / 1e9,
             "vs_raw_read": speed[name] / speed["raw_read"], "vs_copy": speed[name] / speed["copy"],
             "peak_rss_GB": r["peak_rss_bytes"] / 1e9, "cpu_s_per_GB": r["cpu_seconds"] / (r["bytes"] / 1e9),
             "runs_s": "/".join(f"{t:.1f}" for t in r["runs"])}
            for name, r in results.items()]
    goal_rss = 1.5 * largest + 1e9
    imp = results["import"]
    rows.append({"phase": "goals (import)", "vs_raw_read": f"{speed['import'] / speed['raw_read']:.2f} (>=0.5)",
                 "peak_rss_GB": f"{imp['peak_rss_bytes'] / 1e9:.2f} (<={goal_rss / 1e9:.2f})"})
    load = os.getloadavg()[0]
    benchlib.report(f"Checkpoint conversion: {params / 1e9:.2f}B parameters bf16, {len(shards)} shards, largest "
                    f"{largest / 1e9:.2f} GB; {tensors} tensors round-tripped bit-identical; {os.cpu_count()} CPUs, "
                    f"load average {load:.1f} at the end; median of {args.repeat} rounds of all phases", rows,
                    ["phase", "seconds", "GB", "GB_per_s", "vs_raw_read", "vs_copy", "peak_rss_GB",
                     "cpu_s_per_GB", "runs_s"], args.json)


if __name__ == "__main__":
    main()
