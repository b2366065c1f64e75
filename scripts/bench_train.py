"""Benchmark: one training update (forward, backward, clip, AdamW) of our jitted step against our PyTorch
transcription of the reference's (tests/torch_ref/train_loss.py: one pack per forward as each rank runs it),
same weights, same packs, float32 on this machine. Prints seconds per update, token slots per second, the ratio
ours / PyTorch, achieved TFLOP/s and MFU (full bidirectional attention FLOPs; needs a peak, e.g. on GPU); writes
JSON.

    python scripts/bench_train.py [--config small] [--seq-len 256] [--packs 2] [--json out/bench_train.json]
    # a Dream-7B-shaped slice on an accelerator (full width, a few layers, bf16 compute, fp32 masters):
    python scripts/bench_train.py --config omni_diffusion_7b --layers 4 --seq-len 3072 --packs 1 --bf16 --no-torch
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
from omnidiff_jax.train import data
from omnidiff_jax.train.settings import add_training, source
from omnidiff_jax.train.trainer import Trainer, flops_per_token, peak_flops
from torch_ref import dream as dream_ref
from torch_ref import train_loss as ref


def random_packs(layout, seq_len: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` full packs of corrupted random samples (half prompt, half supervised)."""
    rng = np.random.default_rng(seed)
    corruption = data.Corruption(layout.mask, layout.eos)
    spec = data.PackSpec(seq_len, layout.pad)
    packs = []
    for _ in range(count):
        samples, used = [], 0
        while True:
            n = int(rng.integers(seq_len // 8, seq_len // 3))
            ids = rng.integers(0, layout.num_text, n).astype(np.int32)
            sample = corruption({"input_ids": ids, "targets": np.where(np.arange(n) < n // 2, -100, ids)}, rng)
            if used + len(sample["input_ids"]) > seq_len:
                break
            samples.append(sample)
            used += len(sample["input_ids"])
        packs.append(spec.pack(samples, 0))
    return {k: np.stack([p[k] for p in packs]) for k in packs[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (a slice of a big model)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--packs", type=int, default=2, help="packs per update")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights")
    ap.add_argument("--remat", default="none", help="remat policy (none, full, dots, dots_no_batch)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (default: looked up)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="out/bench_train.json")
    args = ap.parse_args()

    cfg = get_config(args.config)
    if args.layers:
        cfg.model.num_layers = args.layers
    cfg.model.dtype = "bfloat16" if args.bf16 else "float32"
    cfg.model.param_dtype, cfg.model.remat_policy = "float32", args.remat
    add_training(cfg, workdir=tempfile.mkdtemp(), seq_len=args.seq_len, micro_batch=args.packs, grad_accum=1,
                 sources={"bench": source("bench", "bench")})
    cfg.train.accumulate = "sum"
    cfg.optim.warmup_ratio = 0.0  # lr 0 for two updates regardless: timing does not care
    layout, model_cfg = token_layout(cfg), dream_config(cfg)
    packs = random_packs(layout, args.seq_len, args.packs)
    c = hf_config(model_cfg, layout, "float32")
    torch_model = None if args.no_torch else dream_ref.random_dream(c)
    if torch_model is not None:
        with tempfile.TemporaryDirectory() as d:
            dream_ref.save_hf(torch_model, d, c)
            params = omnidiff_jax.load_model(d, dtype="float32").params
    else:
        params = omnidiff_jax.init_model(args.config, num_layers=model_cfg.num_layers, param_dtype="float32").params
    trainer = Trainer(cfg)
    state = trainer.init_state({"dream": params})
    del params
    batch = trainer.device_batch(packs)
    holder = {"state": state}

    def ours():
        holder["state"], metrics = trainer.step_fn(holder["state"], batch, trainer.frozen)
        jax.block_until_ready(metrics["loss"])

    slots = args.packs * args.seq_len
    flops = flops_per_token(model_cfg, args.seq_len) * slots
    peak = peak_flops(args.peak_tflops)
    t_ours = benchlib.timeit(ours, warmup=1, reps=args.reps)
    n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    row = {"config": args.config, "layers": model_cfg.num_layers, "params_M": n_params / 1e6,
           "compute": model_cfg.dtype, "packs": args.packs, "seq_len": args.seq_len, "ours_s": t_ours,
           "ours_tok_s": slots / t_ours, "ours_tflops": flops / t_ours / 1e12,
           "mfu": flops / t_ours / (peak * jax.device_count()) if peak else None}
    if torch_model is not None:
        adamw = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        torch_packs = [[{"input_ids": torch.tensor(packs["input_ids"][i:i + 1]).long(),
                         "labels": torch.tensor(packs["labels"][i:i + 1]).long(),
                         "position_ids": torch.tensor(packs["positions"][i:i + 1]).long(),
                         "attention_mask": torch.tensor(packs["valid"][i:i + 1]).long()}
                        for i in range(args.packs)]]
        t_torch = benchlib.timeit(lambda: ref.reference_update(torch_model, adamw, torch_packs, 1e-5),
                                  warmup=1, reps=args.reps)
        row.update(torch_s=t_torch, torch_tok_s=slots / t_torch, ratio=t_ours / t_torch)
    benchlib.report("Training update (ratio = ours / PyTorch; lower is better)", [row],
                    ["config", "layers", "params_M", "compute", "packs", "seq_len", "ours_s", "torch_s", "ratio",
                     "ours_tok_s", "torch_tok_s", "ours_tflops", "mfu"], args.json)


if __name__ == "__main__":
    main()
