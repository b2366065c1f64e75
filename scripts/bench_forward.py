"""Benchmark: jitted forward of our Dream against the PyTorch reference (tests/torch_ref/dream.py), same weights,
same machine, float32. Prints ms per forward and the ratio ours/PyTorch; writes JSON.

    python scripts/bench_forward.py [--configs tiny small] [--length 512] [--batches 1 4] [--json out/bench_forward.json]
"""

from __future__ import annotations

import argparse
import tempfile

import benchlib  # noqa: F401  (puts tests/ on the path)
import jax
import numpy as np
import torch

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.convert.dream import hf_config
from torch_ref import dream as ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="out/bench_forward.json")
    args = ap.parse_args()
    rows = []
    for name in args.configs:
        cfg = get_config(name)
        c = hf_config(dream_config(cfg), token_layout(cfg), "float32")
        tm = ref.random_dream(c)
        with tempfile.TemporaryDirectory() as d:
            ref.save_hf(tm, d, c)
            jm = omnidiff_jax.load_model(d, dtype="float32")
        params = sum(x.size for x in jax.tree.leaves(jm.params))
        for b in args.batches:
            ids = np.random.RandomState(0).randint(0, c["vocab_size"], (b, args.length))
            tids = torch.tensor(ids)
            with torch.inference_mode():
                t_torch = benchlib.timeit(lambda: tm.forward_dream(tids), reps=args.reps)
            t_jax = benchlib.timeit(lambda: jm.logits(ids).block_until_ready(), reps=args.reps)
            rows.append({"config": name, "params_M": params / 1e6, "batch": b, "length": args.length,
                         "ours_ms": t_jax * 1e3, "torch_ms": t_torch * 1e3, "ratio": t_jax / t_torch,
                         "ours_tok_s": b * args.length / t_jax})
    benchlib.report("Dream forward, float32 (ratio = ours / PyTorch; lower is better)", rows,
                    ["config", "params_M", "batch", "length", "ours_ms", "torch_ms", "ratio", "ours_tok_s"], args.json)


if __name__ == "__main__":
    main()
