"""GPU checks run by scripts/gpu_check.sh, in two parts that print tables and write JSON.

`--part forward`: jitted bf16 forward of the `small` config and of a Dream-7B-shaped slice (full width, 4 layers)
with each attention backend (XLA, cuDNN) against our PyTorch reference module (tests/torch_ref/dream.py, SDPA) on
the same GPU: ms, achieved TFLOP/s, the ratio ours / PyTorch, and how far cuDNN's logits are from XLA's.
`--part sampler`: the jitted sampler on the 7B-shaped slice, 64-token prompts, 256 generated tokens in 64 steps,
batch 1 and 8, exact and with the prefix cache: ms per step, tokens/s, batch-8 throughput over batch 1; and the
step's top-k over the vocabulary alone at batch 8, XLA's against the sampler's chunked one.
"""

from __future__ import annotations

import argparse
import time

import benchlib
import jax
import numpy as np
import torch

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.convert.dream import hf_config
from omnidiff_jax.sampler_loop import candidates, chunked_top_k
from torch_ref import dream as dream_ref

SLICE = {"num_layers": 4}  # full width and vocabulary, 4 of the 28 layers
BF16 = {"dtype": "bfloat16", "param_dtype": "bfloat16"}


def forward_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward with full bidirectional attention."""
    h, kv, f = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    per_token_layer = 2 * (h * h * 2 + 2 * h * kv + 3 * h * f) + 4 * length * h
    return batch * length * (cfg.num_layers * per_token_layer + 2 * h * cfg.vocab_size)


def torch_forward_seconds(name: str, overrides: dict, ids: np.ndarray) -> float:
    """Median seconds of our PyTorch reference module's bf16 forward (random weights) on the GPU."""
    cfg = get_config(name)
    c = hf_config(dream_config(cfg).replace(**overrides), token_layout(cfg), "bfloat16")
    with torch.device("cuda"):
        model = dream_ref.DreamModel(c).to(torch.bfloat16).eval()
        x = torch.tensor(ids)

        def run():
            with torch.inference_mode():
                model.forward_dream(x)
            torch.cuda.synchronize()
        t = benchlib.timeit(run, reps=5)
    del model
    torch.cuda.empty_cache()
    return t


def forward_part(rows: list):
    for name, overrides, batch, length in (("small", {}, 4, 512), ("omni_diffusion_7b", SLICE, 1, 2048),
                                          ("omni_diffusion_7b", SLICE, 4, 2048)):
        label = f"{name}{'-4L' if overrides else ''} B={batch} L={length}"
        cfg = dream_config(get_config(name)).replace(**overrides)
        ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length))
        t_torch = torch_forward_seconds(name, overrides, ids)
        rows.append({"check": f"forward {label}", "impl": "torch sdpa", "ms": t_torch * 1e3,
                     "TFLOP/s": forward_flops(cfg, batch, length) / t_torch / 1e12})
        logits = {}
        for impl in ("xla", "cudnn"):
            model = omnidiff_jax.init_model(name, **overrides, **BF16, attention_impl=impl)
            logits[impl] = np.asarray(model.logits(ids), np.float32)
            t = benchlib.timeit(lambda: model.logits(ids).block_until_ready(), reps=5)
            rows.append({"check": f"forward {label}", "impl": impl, "ms": t * 1e3,
                         "TFLOP/s": forward_flops(cfg, batch, length) / t / 1e12, "vs_torch": t / t_torch})
            del model
        a, b = logits["xla"], logits["cudnn"]
        rows.append({"check": f"cudnn vs xla {label}", "impl": "both",
                     "max_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
                     "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())})
        print(time.strftime("%H:%M:%S"), rows[-3:], flush=True)
    return "Forward, bf16", ["check", "impl", "ms", "TFLOP/s", "vs_torch", "max_rel_diff", "argmax_agree"]


def sampler_part(rows: list):
    model = omnidiff_jax.init_model("omni_diffusion_7b", **SLICE, **BF16)
    layout = token_layout(get_config("omni_diffusion_7b"))
    gen_length, steps = 256, 64
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        prompts = list(rng.integers(0, layout.num_text, (batch, 64)).astype(np.int32))
        outputs = {}
        for prefix_cache in (False, True):
            options = dict(gen_length=gen_length, alg="entropy", prefix_cache=prefix_cache)
            omnidiff_jax.sample(model, prompts, steps=1, **options)  # compile: the program does not depend on steps
            start = time.perf_counter()
            outputs[prefix_cache] = omnidiff_jax.sample(model, prompts, steps=steps, **options)
            t = time.perf_counter() - start
            rows.append({"batch": batch, "sampler": "prefix cache" if prefix_cache else "exact",
                         "ms_per_step": t / steps * 1e3, "tokens_per_s": batch * gen_length / t})
        rows[-1]["agree_with_exact"] = float(np.mean([(x == y).mean() for x, y in zip(*outputs.values())]))
        print(time.strftime("%H:%M:%S"), rows[-2:], flush=True)
    single = {r["sampler"]: r["tokens_per_s"] for r in rows if r["batch"] == 1}
    for r in rows:
        r["throughput_vs_batch1"] = r["tokens_per_s"] / single[r["sampler"]]
    # the step's top-k over the vocabulary alone, batch 8: XLA's (a sort) against the sampler's chunked one
    logits = jax.random.normal(jax.random.key(0), (8, gen_length, model.config.vocab_size), jax.numpy.bfloat16)
    count = candidates(model.config.vocab_size, 50)
    for name, top_k in (("top-k alone: lax.top_k", jax.lax.top_k), ("top-k alone: chunked", chunked_top_k)):
        run = jax.jit(lambda x, top_k=top_k: top_k(x.astype(jax.numpy.float32), count))
        rows.append({"batch": 8, "sampler": name, "ms_per_step": benchlib.timeit(
            lambda: jax.block_until_ready(run(logits)), reps=10) * 1e3})
    return (f"Sampler, Dream-7B-shaped slice (4 layers), bf16, prompt 64, {gen_length} tokens in {steps} steps",
            ["batch", "sampler", "ms_per_step", "tokens_per_s", "throughput_vs_batch1", "agree_with_exact"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("forward", "sampler"), required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    title, columns = (forward_part if args.part == "forward" else sampler_part)(rows)
    benchlib.report(f"{title} on {jax.devices()[0].device_kind}", rows, columns, args.json)


if __name__ == "__main__":
    main()
