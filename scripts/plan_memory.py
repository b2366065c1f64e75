"""Plans a training run's device memory before launch: compiles the real train step (forward, backward, gradient
accumulation, clip, AdamW) of a config on abstract arrays over `--devices` fake CPU devices and prints what XLA's
buffer assignment gives each device: parameters, optimizer state, batch (+ frozen speech encoder), activations and
temporaries (the fp32 gradient accumulators included), total, and whether it fits a device of `--device-gb`
(several sizes: a column each).

    python scripts/plan_memory.py --config configs/stage3.py --devices 8 --seq-len 8192 --micro-batch 8 \\
        --remat full --device-gb 80
    python scripts/plan_memory.py --config configs/stage3.py --devices 8 --seq-len 8192 --device-gb 80 141 --search

Nothing is allocated (jax.ShapeDtypeStruct only), so the 7B configs plan on a laptop in minutes. Attention is
planned as the accelerators run it (cuDNN flash attention on GPU, splash on TPU: O(L) residuals per head), by a
blockwise stand-in with the same memory profile in place of the CPU backend, whose [L, L] score matrices no
accelerator holds. The numbers are those of XLA's CPU compiler; an accelerator's fusion and scheduling differ by
a few percent, which is what the headroom is for. `--search` lists, per remat policy and device size, the largest
micro-batch (a multiple of data x fsdp) that fits with `--headroom` to spare.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/stage3.py", help="a training config (name or path)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    ap.add_argument("--devices", type=int, default=8, help="devices of the mesh (fake CPU devices here)")
    ap.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, e.g. 1,8,1 (default: the config's)")
    ap.add_argument("--micro-batch", type=int, default=0, help="packs per micro-batch (default: the config's)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per pack (default: the config's)")
    ap.add_argument("--remat", default="", help="remat policy: none, dots, dots_no_batch, full (default: config's)")
    ap.add_argument("--device-gb", type=float, nargs="+", default=[80.0],
                    help="memory of one device, GB (1e9 bytes); several sizes: a fit column each")
    ap.add_argument("--headroom", type=float, default=0.10, help="share of the device kept free to fit")
    ap.add_argument("--search", action="store_true", help="largest fitting micro-batch per remat policy")
    ap.add_argument("--json", default="", help="also write the rows here")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # the fake device count is fixed when jax starts: set it before the imports below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import omnidiff_jax.models.dream as dream_module  # noqa: E402
from omnidiff_jax import sharding  # noqa: E402
from omnidiff_jax.config import load_config, token_layout  # noqa: E402
from omnidiff_jax.files import write_text  # noqa: E402
from omnidiff_jax.models import projector, sensevoice  # noqa: E402
from omnidiff_jax.speech_in import SpeechInput  # noqa: E402
from omnidiff_jax.train import data  # noqa: E402
from omnidiff_jax.train.speech import speech_encoder  # noqa: E402
from omnidiff_jax.train.trainer import HOST_KEYS, Trainer  # noqa: E402

REMAT_MENU = ("none", "dots_no_batch", "full")
# With a fused attention kernel the only matmuls with batch dimensions, attention's, run inside the kernel, where no
# remat policy sees them: "dots" saves what "dots_no_batch" saves. The stand-in's block matmuls are visible, and
# "dots" would save their outputs too, so it is planned as "dots_no_batch".
PLANNED_AS = {"dots": "dots_no_batch"}
ATTENTION_BLOCK = 512  # query rows per block of the stand-in flash attention
GB = 1e9


def _blocks(x, block):
    """[B, L, ...] -> [L / block, B, block, ...]."""
    return x.reshape(x.shape[0], -1, block, *x.shape[2:]).swapaxes(0, 1)


def _unblocks(x):
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _block_attention(q, k, v, q_segments, k_segments):
    """softmax(q k^T / sqrt(D)) v of a query block q [B, T, Hq, D] over all keys [B, L, Hkv, D], keys of other
    segments hidden; the batch axis kept on its own, so the block splits over devices like the batch."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(q_segments[:, None, :, None] == k_segments[:, None, None, :], scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


@jax.custom_vjp
def _flash_standin(q, k, v, segments):
    """Attention a query block at a time; keeps only its inputs for the backward pass, as flash kernels do."""
    return _flash_forward(q, k, v, segments)[0]


def _flash_forward(q, k, v, segments):
    block = math.gcd(q.shape[1], ATTENTION_BLOCK)
    out = jax.lax.map(lambda xs: _block_attention(xs[0], k, v, xs[1], segments),
                      (_blocks(q, block), _blocks(segments, block)))
    return _unblocks(out), (q, k, v, segments)


def _flash_backward(saved, grad):
    q, k, v, segments = saved
    block = math.gcd(q.shape[1], ATTENTION_BLOCK)

    def body(acc, xs):
        qb, sb, gb = xs
        _, pull = jax.vjp(lambda q_, k_, v_: _block_attention(q_, k_, v_, sb, segments), qb, k, v)
        dq, dk, dv = pull(gb)
        return (acc[0] + dk.astype(jnp.float32), acc[1] + dv.astype(jnp.float32)), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(body, zeros, (_blocks(q, block), _blocks(segments, block), _blocks(grad, block)))
    return _unblocks(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash_standin.defvjp(_flash_forward, _flash_backward)


def planned_attention(q, k, v, *, segment_ids=None, key_segment_ids=None, query_valid=None, implementation=None):
    """`attention.dot_product_attention` as the planner compiles it (training: queries and keys alike)."""
    del implementation, key_segment_ids
    segments = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    out = _flash_standin(q, k, v, segments)
    return out if query_valid is None else out * query_valid[:, :, None, None].astype(out.dtype)


def plan_fused_attention() -> None:
    """From now on Dream compiles its attention as `planned_attention` (memory of a fused kernel, on CPU)."""
    dream_module.dot_product_attention = planned_attention


def abstract_speech(cfg):
    """The stage's speech encoder with abstract weights: (SpeechEncoder whose frozen tree is left out of the
    Trainer, the frozen tree's shapes). SenseVoiceSmall and the Omni-Diffusion projector, as training loads them."""
    encoder = sensevoice.SenseVoiceConfig.small()
    proj = projector.ProjectorConfig.omni_diffusion(hidden_size=cfg.model.hidden_size)
    params = jax.eval_shape(lambda: {"encoder": sensevoice.init_params(encoder, 0),
                                     "projector": projector.init_params(proj, 0)})
    speech = speech_encoder(SpeechInput(encoder, proj, params), cfg.data.max_audios, cfg.data.max_audio_frames)
    return dataclasses.replace(speech, frozen={}), speech.frozen


def abstract_batch(trainer: Trainer) -> dict:
    """One step's packs [accum, micro_batch, ...] as the trainer lays them out (`Trainer.batch_sharding`)."""
    cfg = trainer.cfg
    layout = token_layout(cfg)
    spec = data.PackSpec(cfg.data.seq_len, layout.pad, cfg.data.max_audios, cfg.data.max_audio_frames)
    one = spec.pack([{"input_ids": np.zeros(1, np.int32), "labels": np.full(1, data.IGNORE, np.int32),
                      "mask_prob": np.zeros(1, np.float32)}], 0)
    lead = (cfg.train.grad_accum, cfg.train.micro_batch)
    return {k: jax.ShapeDtypeStruct(lead + v.shape, v.dtype, sharding=trainer.batch_sharding(v.ndim + 2))
            for k, v in one.items() if k not in HOST_KEYS}


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(cfg, mesh) -> dict:
    """Per-device memory of the config's compiled train step on `mesh` (bytes), and the compile time."""
    speech, frozen = abstract_speech(cfg) if cfg.data.max_audios else (None, {})
    trainer = Trainer(cfg, speech=speech, mesh=mesh)
    state = trainer.sharded_abstract_state()
    replicated = NamedSharding(mesh, PartitionSpec())
    frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), frozen)
    batch = abstract_batch(trainer)
    began = time.perf_counter()
    memory = trainer.step_fn.lower(state, batch, frozen).compile().memory_analysis()
    inputs = memory.argument_size_in_bytes
    fresh_outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {"params": device_bytes(state.params), "opt_state": device_bytes(state.opt_state),
            "batch": device_bytes(batch) + device_bytes(frozen),
            "temporaries": memory.temp_size_in_bytes + fresh_outputs,
            "total": inputs + memory.temp_size_in_bytes + fresh_outputs,
            "compile_s": time.perf_counter() - began}


def row(cfg, mesh, device_gb: list[float], headroom: float) -> dict:
    """One table row: the plan in GB and, per device size, the share of the device left ("free_80" for 80 GB)
    and whether it fits with `headroom` ("fits_80")."""
    got = plan(cfg, mesh)
    out = {"remat": cfg.model.remat_policy, "micro_batch": cfg.train.micro_batch, "seq_len": cfg.data.seq_len,
           **{k: round(v / GB, 2) for k, v in got.items() if k != "compile_s"}}
    for gb in device_gb:
        out[f"free_{gb:g}"] = round(1 - got["total"] / (gb * GB), 3)
        out[f"fits_{gb:g}"] = out[f"free_{gb:g}"] >= headroom
    out["compile_s"] = round(got["compile_s"], 1)
    return out


def search(cfg, mesh, device_gb: list[float], headroom: float) -> list[dict]:
    """Per remat policy, micro-batches of 1, 2, 4, ... x (data x fsdp) until one does not fit the largest device
    size: every row tried."""
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = []
    for policy in REMAT_MENU:
        cfg.model.remat_policy, k = policy, 1
        while True:
            cfg.train.micro_batch = split * k
            rows.append(row(cfg, mesh, device_gb, headroom))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if not rows[-1][f"fits_{max(device_gb):g}"]:
                break
            k *= 2
    return rows


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, [tuple(s.split("=", 1)) for s in args.set])
    if args.mesh:
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in args.mesh.split(","))
    cfg.data.seq_len = args.seq_len or cfg.data.seq_len
    cfg.train.micro_batch = args.micro_batch or cfg.train.micro_batch
    policy = args.remat or cfg.model.remat_policy
    cfg.model.remat_policy = PLANNED_AS.get(policy, policy)
    if policy in PLANNED_AS:
        print(f"remat {policy} is planned as {PLANNED_AS[policy]}: the same residuals with fused attention")
    mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    plan_fused_attention()
    sizes = " / ".join(f"{gb:g}" for gb in args.device_gb)
    print(f"{args.config}: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, vocab {cfg.model.vocab_size}, "
          f"mesh {dict(mesh.shape)}, {cfg.data.seq_len} tokens per pack, device {sizes} GB, "
          f"headroom {args.headroom:.0%}; per-device GB:")
    rows = (search(cfg, mesh, args.device_gb, args.headroom) if args.search
            else [row(cfg, mesh, args.device_gb, args.headroom)])
    columns = ["remat", "micro_batch", "params", "opt_state", "batch", "temporaries", "total",
               *(f"{c}_{gb:g}" for gb in args.device_gb for c in ("free", "fits")), "compile_s"]
    print(" | ".join(f"{c:>11}" for c in columns))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>11}" for c in columns))
    if args.search:
        for policy, gb in itertools.product(REMAT_MENU, args.device_gb):
            fitting = [r["micro_batch"] for r in rows if r["remat"] == policy and r[f"fits_{gb:g}"]]
            print(f"largest micro-batch with remat={policy} on {gb:g} GB: {max(fitting) if fitting else 'none fits'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps({"config": args.config, "devices": args.devices,
                                          "device_gb": args.device_gb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main(ARGS)
