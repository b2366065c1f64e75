"""Benchmark: our jitted sampler against the PyTorch transcription of the reference loop (tests/torch_ref/sampler.py)
on the same weights and machine, float32, config `small`: 256 generated tokens in 256 and in 64 steps, batch 1
and 8, exact and in every fast mode `sample` offers (prefix and dual cache, confidence threshold --taus, cosine
schedule). Prints ms per step (per step actually run), generated tokens/s, model evaluations per request (the steps
each row ran, from the sampler's history), the speedup over PyTorch, and the share of tokens equal to the exact
sampler's; writes JSON. The reference loop only runs one
prompt at a time (with B > 1 its row-0 block flags do not match the pooled rows), so its batch-B time is B times
one single-prompt run. Each of our runs is timed `--repeats` times, and the fastest counts (the machine is shared).

    python scripts/bench_sampler.py [--config small] [--prompt-length 64] [--json out/bench_sampler.json]
    python scripts/bench_sampler.py --real-vocab --prompt-length 12 --steps 16 --batches 1 --block-sizes -1 32
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import tempfile
import time

import benchlib  # noqa: F401  (puts tests/ on the path)
import numpy as np
import torch

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.convert.dream import hf_config
from omnidiff_jax.sampler import sample
from torch_ref import dream as dream_ref
from torch_ref.sampler import reference_sample


def timed(fn, repeats: int = 1):
    """(fn(), seconds): the fastest of `repeats` runs; a whole generation is long enough to time on its own."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def modes(taus) -> dict[str, dict]:
    """Our sampler's modes that `sample` offers: name -> its options."""
    every = {"ours": {}, "ours + prefix cache": {"prefix_cache": True}, "ours + dual cache": {"dual_cache": True},
             **{f"ours, tau {tau}": {"threshold": tau} for tau in taus},
             "ours, cosine schedule": {"mask_schedule": "cosine"}}
    offered = set(inspect.signature(sample).parameters)
    return {name: options for name, options in every.items() if set(options) <= offered}


def fastest_torch_threads(tm, layout, prompt_length: int) -> int:
    """Sets torch to the faster of 1 thread or all cores for the reference loop (OpenMP threads can slow
    down by orders of magnitude on a busy machine), judged on a short run; returns the choice."""
    embeds = tm.model.embed_tokens(torch.zeros((1, prompt_length), dtype=torch.long)).detach()
    times = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        _, times[threads] = timed(lambda: reference_sample(tm, embeds, gen_length=32, steps=4, mask_id=layout.mask,
                                                           boa_id=layout.begin_of_audio))
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--steps", nargs="+", type=int, default=[256, 64])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=[-1], help="-1: one block")
    ap.add_argument("--alg", default="entropy")
    ap.add_argument("--real-vocab", action="store_true", help="the released model's 176264-token vocabulary")
    ap.add_argument("--taus", nargs="*", type=float, default=[0.9], help="confidence thresholds to run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default="out/bench_sampler.json")
    args = ap.parse_args()

    cfg = get_config(args.config)
    if args.real_vocab:
        released = get_config("omni_diffusion_7b")
        cfg.vocab = released.vocab
        for key in ("vocab_size", "mask_token_id", "pad_token_id"):
            cfg.model[key] = released.model[key]
    c = hf_config(dream_config(cfg), token_layout(cfg), "float32")
    tm = dream_ref.random_dream(c)
    with torch.no_grad():  # sharper distributions than raw random weights, as the tests' fixture
        tm.lm_head.weight.mul_(3.0)
    with tempfile.TemporaryDirectory() as d:
        dream_ref.save_hf(tm, d, c)
        jm = omnidiff_jax.load_model(d, dtype="float32")
    layout = token_layout(cfg)
    rng = np.random.default_rng(0)
    torch_threads = fastest_torch_threads(tm, layout, args.prompt_length)
    n = args.gen_length
    rows = []
    for b in args.batches:
        prompts = rng.integers(0, layout.num_text, (b, args.prompt_length)).astype(np.int32)
        with torch.no_grad():
            embeds = tm.model.embed_tokens(torch.tensor(prompts, dtype=torch.long))
        for steps, block_size in itertools.product(args.steps, args.block_sizes):
            options = dict(gen_length=n, steps=steps, alg=args.alg, block_size=block_size)

            with torch.inference_mode():  # the reference loop cannot batch: B prompts cost B single runs
                _, t_torch = timed(lambda: reference_sample(tm, embeds[:1], mask_id=layout.mask,
                                                            boa_id=layout.begin_of_audio, **options))
            t_torch *= b
            rows.append({"batch": b, "steps": steps, "block_size": block_size, "sampler": "torch reference",
                         "torch_threads": torch_threads, "ms_per_step": t_torch / steps * 1e3,
                         "tokens_per_s": b * n / t_torch, "evals_per_request": steps, "speedup_vs_torch": 1.0})
            exact = None
            for name, mode in modes(args.taus).items():
                run = lambda: sample(jm, list(prompts), return_history=True, **options, **mode)  # noqa: E731
                # compile (one step: the program does not depend on `steps`)
                sample(jm, list(prompts), return_history=True, **{**options, "steps": 1}, **mode)
                (out, history), t = timed(run, args.repeats)
                exact = out if exact is None else exact  # "ours" comes first
                evals = float(np.mean([len(h) for h in history]))  # model passes: the steps each row ran
                rows.append({"batch": b, "steps": steps, "block_size": block_size, "sampler": name,
                             "ms_per_step": t / max(len(h) for h in history) * 1e3, "tokens_per_s": b * n / t,
                             "evals_per_request": evals, "speedup_vs_torch": t_torch / t,
                             "agree_with_exact": float(np.mean([(x == y).mean() for x, y in zip(exact, out)]))})
                print(time.strftime("%H:%M:%S"), rows[-1], flush=True)
    setting = lambda r: (r["steps"], r["block_size"], r["sampler"])  # noqa: E731
    single = {setting(r): r["tokens_per_s"] for r in rows if r["batch"] == 1}
    for r in rows:
        if r["batch"] != 1 and setting(r) in single:
            r["throughput_vs_batch1"] = r["tokens_per_s"] / single[setting(r)]
    columns = ["batch", "steps", "block_size", "sampler", "ms_per_step", "tokens_per_s", "evals_per_request",
               "speedup_vs_torch", "throughput_vs_batch1", "agree_with_exact"]
    benchlib.report(f"Sampler, config {args.config}, float32, prompt {args.prompt_length}, {n} generated tokens "
                    f"(alg {args.alg})", rows, columns, args.json)


if __name__ == "__main__":
    main()
