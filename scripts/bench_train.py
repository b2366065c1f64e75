"""Benchmark: one training update (forward, backward, clip, AdamW) of our jitted step against our PyTorch
transcription of the reference's (tests/torch_ref/train_loss.py: one pack per forward as each rank runs it),
same weights, same packs, float32 on this machine. Prints seconds per update, token slots per second, the ratio
ours / PyTorch, achieved TFLOP/s and MFU, per remat policy; writes JSON.

MFU is the same on every device: model FLOPs (6 x matmul parameters x token slots, plus 12 x layers x length x
width per slot for full bidirectional attention; `trainer.flops_per_token`, whatever the remat policy
recomputes) over seconds x the device's dense bf16 peak (`trainer.PEAK_FLOPS`, or --peak-tflops) x devices.
`attention` says which kernel the compiled step runs: cudnn (flash attention, packed segments as a mask) or xla.

    python scripts/bench_train.py [--config small] [--seq-len 256] [--packs 2] [--json out/bench_train.json]
    # a Dream-7B-shaped slice on an accelerator (full width, a few layers, bf16 compute, fp32 masters), the
    # remat menu:
    python scripts/bench_train.py --config omni_diffusion_7b --layers 4 --seq-len 3072 --packs 1 --bf16 \
        --remat none dots full --no-torch
    # the loss's memory (XLA's compiled memory analysis of loss + gradient, alone and in the whole micro-batch)
    # with full logits and chunked:
    python scripts/bench_train.py --memory --config small --seq-len 3072 8192 --packs 1 --remat full
"""

from __future__ import annotations

import argparse
import tempfile

import benchlib  # noqa: F401  (puts tests/ on the path)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from plan_memory import plan_fused_attention
from test_loss import full_logits_loss, full_logits_losses

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config, token_layout
from omnidiff_jax.convert.dream import hf_config
from omnidiff_jax.model import abstract_dream
from omnidiff_jax.models.dream import REMAT_POLICIES, Dream, stack_layers
from omnidiff_jax.train import data, loss
from omnidiff_jax.train.settings import add_training, source
from omnidiff_jax.train.trainer import Trainer, flops_per_token, peak_flops
from torch_ref import dream as dream_ref
from torch_ref import train_loss as ref

CUDNN_ATTENTION = "__cudnn$fmha"  # the custom-call prefix of cuDNN's fused attention in compiled HLO


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


def model_config(args, seq_len: int):
    """The benchmarked config: `--config` with `--layers`, compute dtype, fp32 masters, one update of `--packs`."""
    cfg = get_config(args.config)
    if args.layers:
        cfg.model.num_layers = args.layers
    cfg.model.dtype = "bfloat16" if args.bf16 else "float32"
    cfg.model.param_dtype = "float32"
    add_training(cfg, workdir=tempfile.mkdtemp(), seq_len=seq_len, micro_batch=args.packs, grad_accum=1,
                 sources={"bench": source("bench", "bench")})
    cfg.train.accumulate = "sum"
    cfg.optim.warmup_ratio = 0.0  # lr 0 for two updates regardless: timing does not care
    return cfg


def temporaries(fn, *args) -> float:
    """GB of temporaries XLA's buffer assignment gives the compiled value and gradient of `fn` (arguments
    abstract, nothing allocated; the gradient with respect to every argument but the last)."""
    argnums = tuple(range(len(args) - 1))
    compiled = jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e9


def loss_memory(args) -> list[dict]:
    """XLA's memory analysis of the loss with full float32 logits (the removed path, kept in tests/test_loss.py)
    and chunked, twice: the loss alone (head + cross-entropy and their gradient from the final hidden states of
    one micro-batch) and the whole micro-batch (embeddings, Dream, loss, gradient). Attention is compiled as the
    accelerators' fused kernels hold it (`plan_memory.plan_fused_attention`): the CPU backend's [L, L] scores
    would otherwise set the peak."""
    plan_fused_attention()
    rows = []
    for seq_len in args.seq_len:
        cfg = model_config(args, seq_len)
        params = {"dream": nn.meta.unbox(abstract_dream(dream_config(cfg)))}
        pack = random_packs(token_layout(cfg), seq_len, args.packs)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pack.items() if k != "task"}
        dtype, head = cfg.model.dtype, params["dream"]["lm_head"]["embedding"]
        hidden = jax.ShapeDtypeStruct((args.packs, seq_len, head.shape[1]), jnp.dtype(dtype))
        alone = {"full": temporaries(lambda h, w, b: full_logits_losses(h, w.astype(dtype), b["labels"], None,
                                                                        "reference").mean(), hidden, head, batch),
                 "chunked": temporaries(lambda h, w, b: loss.pack_losses(h, w, b["labels"], dtype=dtype)[0].mean(),
                                        hidden, head, batch)}
        for policy in args.remat:
            cfg.model.remat_policy = policy
            module = Dream(dream_config(cfg))
            step = {"full": temporaries(lambda p, b: full_logits_loss(module, p, b, "reference")[0], params, batch),
                    "chunked": temporaries(lambda p, b: loss.batch_loss(module, p, b)[0], params, batch)}
            rows.append({"config": args.config, "layers": cfg.model.num_layers, "compute": dtype, "remat": policy,
                         "packs": args.packs, "seq_len": seq_len, "vocab": cfg.model.vocab_size,
                         "logits_gb": args.packs * seq_len * cfg.model.vocab_size * 4 / 1e9,
                         "loss_full_gb": alone["full"], "loss_chunked_gb": alone["chunked"],
                         "step_full_gb": step["full"], "step_chunked_gb": step["chunked"],
                         "step_saved_gb": step["full"] - step["chunked"]})
    benchlib.report("Temporaries of loss + gradient (XLA memory analysis, GB; logits_gb = one float32 [tokens, "
                    "vocab]): the loss alone from the final hidden states, and the whole micro-batch step", rows,
                    ["config", "layers", "compute", "remat", "packs", "seq_len", "vocab", "logits_gb",
                     "loss_full_gb", "loss_chunked_gb", "step_full_gb", "step_chunked_gb", "step_saved_gb"],
                    args.json)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (a slice of a big model)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[256], help="tokens per pack (several: a row each)")
    ap.add_argument("--packs", type=int, default=2, help="packs per update")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights")
    ap.add_argument("--remat", nargs="+", default=["none"], choices=sorted(REMAT_POLICIES),
                    help="remat policies (a row each)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (default: looked up)")
    ap.add_argument("--memory", action="store_true", help="compare the loss's memory, full logits vs chunked")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="out/bench_train.json")
    args = ap.parse_args()
    if args.memory:
        loss_memory(args)
        return
    rows = []
    for seq_len in args.seq_len:
        rows += time_updates(args, seq_len)
    benchlib.report("Training update (ratio = ours / PyTorch; lower is better)", rows,
                    ["config", "layers", "params_M", "compute", "remat", "attention", "packs", "seq_len", "ours_s",
                     "torch_s", "ratio", "ours_tok_s", "torch_tok_s", "ours_tflops", "mfu"], args.json)


def time_updates(args, seq_len: int) -> list[dict]:
    """One row per remat policy: our update's time, throughput and MFU, and PyTorch's (once, no remat there)."""
    cfg = model_config(args, seq_len)
    layout, model_cfg = token_layout(cfg), dream_config(cfg)
    packs = random_packs(layout, seq_len, args.packs)
    c = hf_config(model_cfg, layout, "float32")
    torch_model = None if args.no_torch else dream_ref.random_dream(c)
    if torch_model is not None:
        with tempfile.TemporaryDirectory() as d:
            dream_ref.save_hf(torch_model, d, c)
            model = omnidiff_jax.load_model(d, dtype="float32")
    else:
        model = omnidiff_jax.init_model(args.config, num_layers=model_cfg.num_layers, param_dtype="float32")
    params = stack_layers(model.params)  # the training layout
    slots = args.packs * seq_len
    flops = flops_per_token(model_cfg, seq_len) * slots
    peak = peak_flops(args.peak_tflops)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for policy in args.remat:
        cfg.model.remat_policy = policy
        trainer = Trainer(cfg)
        holder = {"state": trainer.init_state({"dream": params})}
        batch = trainer.device_batch(packs)
        hlo = trainer.step_fn.lower(holder["state"], batch, trainer.frozen).compile().as_text()

        def ours():
            holder["state"], metrics = trainer.step_fn(holder["state"], batch, trainer.frozen)
            jax.block_until_ready(metrics["loss"])

        t_ours = benchlib.timeit(ours, warmup=1, reps=args.reps)
        del holder
        rows.append({"config": args.config, "layers": model_cfg.num_layers, "params_M": n_params / 1e6,
                     "compute": model_cfg.dtype, "remat": policy,
                     "attention": "cudnn" if CUDNN_ATTENTION in hlo else "xla", "packs": args.packs,
                     "seq_len": seq_len, "ours_s": t_ours, "ours_tok_s": slots / t_ours,
                     "ours_tflops": flops / t_ours / 1e12,
                     "mfu": flops / t_ours / (peak * jax.device_count()) if peak else None})
    if torch_model is not None:
        adamw = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        torch_packs = [[{"input_ids": torch.tensor(packs["input_ids"][i:i + 1]).long(),
                         "labels": torch.tensor(packs["labels"][i:i + 1]).long(),
                         "position_ids": torch.tensor(packs["positions"][i:i + 1]).long(),
                         "attention_mask": torch.tensor(packs["valid"][i:i + 1]).long()}
                        for i in range(args.packs)]]
        t_torch = benchlib.timeit(lambda: ref.reference_update(torch_model, adamw, torch_packs, 1e-5),
                                  warmup=1, reps=args.reps)
        for r in rows:
            r.update(torch_s=t_torch, torch_tok_s=slots / t_torch, ratio=r["ours_s"] / t_torch)
    return rows


if __name__ == "__main__":
    main()
