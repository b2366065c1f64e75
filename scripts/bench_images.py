"""Benchmark: MAGVIT-v2 encode (image -> codes) and decode (codes -> image), ours (jitted) against the PyTorch
reference (tests/torch_ref/magvit.py), same random weights, same machine, float32. Prints images/s and the
time ratio ours/PyTorch; writes JSON.

    python scripts/bench_images.py [--config magvitv2|tiny] [--sizes 256 512] [--batches 1 8] [--reps 3] \
        [--json out/bench_images.json]

The released size is heavy on a CPU (0.35 TFLOP to encode a 256-pixel image, 0.3 to decode, 4x that at 512):
pick sizes and batches to fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import benchlib  # noqa: F401  (puts tests/ on the path)
import numpy as np
import torch
from safetensors.torch import save_file

from omnidiff_jax.image import ImageTokenizer
from omnidiff_jax.models.magvit import CODEBOOK_SIZE, MagvitConfig
from torch_ref.magvit import random_magvit

CONFIGS = {"magvitv2": MagvitConfig(), "tiny": MagvitConfig.tiny()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="magvitv2")
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="out/bench_images.json")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    ref = random_magvit(dataclasses.asdict(cfg))
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(Path(d) / "m.safetensors"))
        tok = ImageTokenizer.load(Path(d) / "m.safetensors")
    rng = np.random.RandomState(0)
    rows = []
    for size in args.sizes:
        side = size // cfg.downsample_factor
        for b in args.batches:
            pixels = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
            codes = rng.randint(0, CODEBOOK_SIZE, (b, side * side))
            t_pixels, t_codes = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(codes)
            for op, ours, theirs in (("encode", lambda: tok.encode_images(pixels), lambda: ref.get_code(t_pixels)),
                                     ("decode", lambda: tok.decode_codes(codes), lambda: ref.decode_code(t_codes))):
                with torch.inference_mode():
                    t_torch = benchlib.timeit(theirs, reps=args.reps)
                t_ours = benchlib.timeit(ours, reps=args.reps)  # returns NumPy: blocks until done
                rows.append({"config": args.config, "op": op, "size": size, "batch": b,
                             "ours_img_s": b / t_ours, "torch_img_s": b / t_torch, "ratio": t_ours / t_torch})
    benchlib.report("MAGVIT-v2 images/s, float32 (ratio = our time / PyTorch time; lower is better)", rows,
                    ["config", "op", "size", "batch", "ours_img_s", "torch_img_s", "ratio"], args.json)


if __name__ == "__main__":
    main()
