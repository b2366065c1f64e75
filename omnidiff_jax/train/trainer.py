"""The training loop: a sharded, jitted train step with gradient accumulation, resumed from the run's orbax
checkpoints (`train.checkpoints`), with metrics (loss, per-task loss, lr, grad norm, tokens/s, MFU) to stdout and
the metrics log (`train.metrics`).

One step consumes `grad_accum` micro-batches of `micro_batch` packs each (the reference: 8 devices x 1 pack,
16 accumulation steps = 128 packs per update):

    for each micro-batch m:  g_m = grad of mean over packs of (the pack's token-mean CE)   fp32 accumulators
    g = mean_m g_m           (accumulate="sum" gives the reference's sum, 16x the mean)
    params <- AdamW(clip(freeze_pad_row(g)))                                              see optim.py

Parameters are fp32 masters (`model.param_dtype`); compute runs in `model.dtype`. Parameters and optimizer state
are laid out on the (data, fsdp, tensor) mesh by the logical rules of `omnidiff_jax.sharding`, packs are split
over data x fsdp. A checkpoint holds the step, parameters, optimizer state, the step RNG and every process's
data-iterator position; orbax writes it asynchronously into a temporary folder renamed when complete, so after a
`kill -9` the run restarts from the last complete one and continues exactly as if uninterrupted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from omnidiff_jax import sharding
from omnidiff_jax.config import dream_config, token_layout
from omnidiff_jax.model import abstract_dream
from omnidiff_jax.models.dream import Dream, DreamConfig
from omnidiff_jax.train import checkpoints, data
from omnidiff_jax.train.init import initial_params as default_params
from omnidiff_jax.train.loss import SpeechEncoder, batch_loss
from omnidiff_jax.train.metrics import MetricsLog, Profile, summary_line
from omnidiff_jax.train.optim import frozen_norm, make_optimizer
from omnidiff_jax.train.speech import speech_encoder_from_config

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, for MFU (by jax device_kind prefix).
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}
HOST_KEYS = ("task",)  # pack fields used for logging only


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: update count, fp32 parameters, optimizer state, RNG key data (uint32)."""

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array


def flops_per_token(cfg: DreamConfig, seq_len: int) -> float:
    """Training FLOPs per token slot (forward + backward, no remat): 6 x matmul parameters (lm_head included,
    the embedding gather not) + 12 x layers x seq_len x hidden for full bidirectional attention."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    dense = cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size
    return 6.0 * dense + 12.0 * cfg.num_layers * seq_len * q


def peak_flops(configured: float) -> float | None:
    """Peak FLOP/s of one device: `train.peak_tflops` if set, else the table above (None when unknown)."""
    if configured:
        return configured * 1e12
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


class Trainer:
    """Trains the Dream LLM per a training config (see configs/train_tiny.py for every field)."""

    def __init__(self, cfg: ml_collections.ConfigDict, speech: SpeechEncoder | None = None, mesh=None):
        """speech: the speech encoder for user speech (default: built from `speech.path` when data.max_audios
        > 0); mesh: default `sharding.make_mesh(**cfg.mesh)` over all devices."""
        self.cfg = cfg
        self.layout = token_layout(cfg)
        self.model_cfg = dream_config(cfg)
        self.module = Dream(self.model_cfg)
        self.mesh = mesh or sharding.make_mesh(**cfg.mesh.to_dict())
        self.tx, self.schedule = make_optimizer(cfg.optim, self.layout.pad)
        if speech is None and cfg.data.max_audios:
            speech = speech_encoder_from_config(cfg)
        self.speech = speech
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.frozen = jax.device_put(speech.frozen, replicated) if speech else {}
        self.tasks = sorted({src.task for src in cfg.data.sources.values()})
        t = cfg.train
        if t.accumulate not in ("mean", "sum"):
            raise ValueError(f"train.accumulate must be 'mean' or 'sum', got {t.accumulate!r}")
        split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.streams = cfg.data.streams or jax.process_count()
        if t.micro_batch % split or t.micro_batch % self.streams:
            raise ValueError(f"train.micro_batch {t.micro_batch} must be a multiple of the data x fsdp mesh size "
                             f"{split} and of the data streams {self.streams}")
        self.workdir = Path(t.workdir)
        self.dream_shapes = abstract_dream(self.model_cfg)  # traced once: shapes and logical axes of Dream's params
        self.state_shardings = self._state_shardings()
        self.step_fn = jax.jit(self._step, donate_argnums=0, out_shardings=(self.state_shardings, replicated))

    # ------------------------------------------------------------------ state
    def abstract_state(self) -> TrainState:
        """Shapes and dtypes of the state (trainable trees: "dream", plus the speech projector if any)."""
        params = {"dream": nn.meta.unbox(self.dream_shapes)}
        if self.speech is not None:
            dtype = self.model_cfg.param_dtype  # init_state casts every trainable tree to it
            params.update(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), self.speech.params))
        return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(self.tx.init, params),
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32))

    def sharded_abstract_state(self) -> TrainState:
        """`abstract_state` with each leaf's sharding on the mesh: a restore target, or a compile input."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state(),
                            self.state_shardings)

    def _state_shardings(self) -> TrainState:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract = self.abstract_state()
        params = jax.tree.map(lambda _: replicated, abstract.params)
        params["dream"] = sharding.param_shardings(self.dream_shapes, self.mesh)
        opt = optax.tree_map_params(self.tx, lambda _, s: s, abstract.opt_state, params,
                                    transform_non_params=lambda _: replicated)
        return TrainState(step=replicated, params=params, opt_state=opt, rng=replicated)

    def init_state(self, params: dict) -> TrainState:
        """A fresh state (step 0) around `params`, laid out on the mesh."""
        if self.speech is not None:
            params = {**self.speech.params, **params}

        def init(params):
            params = jax.tree.map(lambda p: p.astype(self.model_cfg.param_dtype), params)
            rng = jax.random.key_data(jax.random.key(self.cfg.train.seed)).astype(jnp.uint32)
            return TrainState(jnp.int32(0), params, self.tx.init(params), rng)

        return jax.jit(init, out_shardings=self.state_shardings)(params)

    # ------------------------------------------------------------------ step
    def _step(self, state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        cfg = self.cfg
        accum = batch["input_ids"].shape[0]
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def loss_fn(params, micro, key):
            with sharding.activate(self.mesh):
                return batch_loss(self.module, params, micro, cfg.train.objective, self.speech, frozen, key)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(acc, xs):
            (loss, aux), grads = grad_fn(state.params, *xs)
            return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), (loss, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, (losses, aux) = jax.lax.scan(micro_step, zeros, (batch, jax.random.split(step_rng, accum)))
        if cfg.train.accumulate == "mean":
            grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": losses.mean(), "lr": self.schedule(state.step),
                   "grad_norm": frozen_norm(grads, self.layout.pad, cfg.optim.freeze_pad_row), **aux}
        new = TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng).astype(jnp.uint32))
        return new, metrics

    def device_batch(self, packs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host packs [accum * local batch, ...] -> global arrays [accum, micro_batch, ...] split on axis 1."""
        accum, micro = self.cfg.train.grad_accum, self.cfg.train.micro_batch
        out = {}
        for key, value in packs.items():
            if key in HOST_KEYS:
                continue
            local = value.reshape(accum, -1, *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(
                self.batch_sharding(local.ndim), local, (accum, micro, *value.shape[1:]))
        return out

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Where a batch array [accum, micro_batch, ...] of `ndim` axes lives: its packs split over data x fsdp."""
        return NamedSharding(self.mesh, PartitionSpec(None, ("data", "fsdp"), *([None] * (ndim - 2))))

    # ------------------------------------------------------------------ data
    def data_iterator(self) -> data.Streams:
        """This process's streams of packs from the `data` section (sources in name order, at position 0)."""
        d = self.cfg.data
        sources = []
        for name, src in sorted(d.sources.items()):
            sources.append(data.Source(name, data.open_source(Path(d.root) / src.path), src.ratio,
                                       src.num if src.num >= 0 else None, self.tasks.index(src.task)))
        spec = data.PackSpec(d.seq_len, self.layout.pad, d.max_audios, d.max_audio_frames)
        corruption = data.Corruption(self.layout.mask, self.layout.eos, d.tail_max, d.mask_eps, d.special_ratio,
                                     d.noise)
        return data.Streams(lambda s: data.pack_iterator(sources, spec, corruption, d.seed, s, self.streams),
                            self.streams, jax.process_index(), jax.process_count())

    # ------------------------------------------------------------------ loop
    def run(self, initial_params=None, progress: bool = True, profile: tuple[int, int] | None = None) -> TrainState:
        """Trains to `train.steps`, resuming from the workdir's latest checkpoint if there is one.

        `initial_params` ({"dream": ...}) is used only on a fresh start; by default `cfg.init` decides.
        `profile` (START, STOP): a jax.profiler trace of updates START..STOP-1 in `workdir`/profile."""
        t = self.cfg.train
        self.workdir.mkdir(parents=True, exist_ok=True)
        checkpoints.write_config(self.workdir, self.cfg)
        iterator = self.data_iterator()
        manager = checkpoints.manager(self.workdir, t.keep_checkpoints)
        latest = manager.latest_step()
        if latest is None:
            if initial_params is None:
                initial_params = default_params(self.cfg, self.model_cfg, self.mesh)
            state = self.init_state(initial_params)
        else:
            state = checkpoints.restore(manager, latest, self.sharded_abstract_state(), iterator)
            log.info("resumed from step %d", latest)
        start = int(state.step)
        metrics_log = MetricsLog(self.workdir / "metrics.jsonl", start)
        profiler = Profile(self.workdir / "profile", profile)
        slots = t.grad_accum * t.micro_batch * self.cfg.data.seq_len
        step_flops = flops_per_token(self.model_cfg, self.cfg.data.seq_len) * slots
        peak = peak_flops(t.peak_tflops)
        rows = t.micro_batch // jax.process_count()
        bar = tqdm(total=t.steps, initial=start, desc="train", disable=not progress or jax.process_index() > 0)
        packs = iterator.next_packs(t.grad_accum, rows) if start < t.steps else None
        for step in range(start, t.steps):
            profiler.before(step)
            began = time.perf_counter()
            state, metrics = self.step_fn(state, self.device_batch(packs), self.frozen)  # runs asynchronously
            done, data_state, dropped = packs, iterator.get_state(), iterator.dropped()
            if step + 1 < t.steps:
                packs = iterator.next_packs(t.grad_accum, rows)  # the next batch, read while the device computes
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - began
            profiler.after(step)
            record = self._record(step + 1, metrics, done, seconds, step_flops, peak, dropped)
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                metrics_log.write(record)
                if jax.process_index() == 0:
                    bar.write(summary_line(record))
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update()
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                checkpoints.save(manager, state, data_state)
        bar.close()
        profiler.close()
        metrics_log.close()
        manager.wait_until_finished()
        manager.close()
        return state

    def _record(self, step, metrics, packs, seconds, step_flops, peak, dropped) -> dict:
        """The step's log record over every process's packs (gathered: each process holds its own rows)."""
        counts = np.asarray([packs["valid"].sum(), *dropped.values()])
        tasks, counts = multihost_utils.process_allgather((packs["task"].reshape(self.cfg.train.grad_accum, -1),
                                                           counts))
        tasks = tasks.transpose(1, 0, 2).reshape(-1)  # [processes, accum, rows] -> the global [accum, micro] order
        counts = counts.sum(axis=0)
        losses = np.asarray(metrics["pack_loss"]).reshape(-1)
        per_task = {self.tasks[k]: float(losses[tasks == k].mean()) for k in np.unique(tasks)}
        record = {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                  "grad_norm": float(metrics["grad_norm"]), "task_loss": per_task,
                  "tokens_per_s": packs["input_ids"].size * jax.process_count() / seconds,
                  "valid_tokens": int(counts[0]),
                  "supervised_tokens": int(np.asarray(metrics["pack_tokens"]).sum()),
                  "step_s": seconds, "dropped": dict(zip(dropped, map(int, counts[1:])))}
        if peak:
            record["mfu"] = step_flops / seconds / (peak * jax.device_count())
        return record
