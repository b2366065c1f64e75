"""GPU checks run by scripts/gpu_check.sh: attention backends agree in bf16, and forward timings in a table.

Rows: cuDNN vs XLA attention (bf16, max relative difference of logits), and jitted forward time of the `small`
config and of a Dream-7B-shaped slice (full width, 4 layers, L=2048) in bf16, with achieved TFLOP/s.
"""

from __future__ import annotations

import argparse

import benchlib
import jax
import numpy as np

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config


def forward_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward with full bidirectional attention."""
    h, kv, f = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_token_layer = 2 * (h * h * 2 + 2 * h * kv + 3 * h * f) + 4 * length * h
    return batch * length * (cfg.num_layers * per_token_layer + 2 * h * cfg.vocab_size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="out/gpu_check.json")
    args = ap.parse_args()
    rows = []
    for name, overrides, batch, length in (("small", {}, 4, 512),
                                          ("omni_diffusion_7b", {"num_layers": 4}, 1, 2048)):
        cfg = dream_config(get_config(name)).replace(dtype="bfloat16", param_dtype="bfloat16", **overrides)
        ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length))
        results = {}
        for impl in ("xla", "cudnn"):
            model = omnidiff_jax.init_model(name, **{**overrides, "dtype": "bfloat16", "param_dtype": "bfloat16",
                                                    "attention_impl": impl})
            logits = model.logits(ids)
            t = benchlib.timeit(lambda: model.logits(ids).block_until_ready(), reps=5)
            results[impl] = (np.asarray(logits), t)
            rows.append({"check": f"forward {name}{'-4L' if overrides else ''} B={batch} L={length}",
                         "attention": impl, "ms": t * 1e3, "TFLOP/s": forward_flops(cfg, batch, length) / t / 1e12})
            del model
        a, b = results["xla"][0], results["cudnn"][0]
        rows.append({"check": f"cudnn vs xla logits {name}", "attention": "both",
                     "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
                     "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())})
    benchlib.report(f"GPU check on {jax.devices()[0].device_kind}", rows,
                    ["check", "attention", "ms", "TFLOP/s", "max_rel_diff", "argmax_agree"], args.json)


if __name__ == "__main__":
    main()
