"""Observability of a training run: TensorBoard event files beside metrics.jsonl hold the logged scalars (read
back with the tensorboard package itself), and --profile leaves a jax.profiler trace of the chosen updates."""

import json

import jax
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_data import write_tiny_dataset

from omnidiff_jax.config import get_config
from omnidiff_jax.sharding import make_mesh
from omnidiff_jax.train.trainer import Trainer


def test_tensorboard_scalars_and_profile_of_a_three_step_run(tmp_path):
    write_tiny_dataset(tmp_path / "data")
    cfg = get_config("configs/train_tiny.py")
    cfg.data.root, cfg.train.workdir = str(tmp_path / "data"), str(tmp_path / "run")
    cfg.train.steps, cfg.train.log_every, cfg.train.peak_tflops = 3, 1, 1.0  # a peak, so MFU is logged
    Trainer(cfg, mesh=make_mesh(devices=jax.devices()[:1])).run(progress=False, profile=(1, 3))

    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    tasks = {f"task_loss/{t}" for r in logged for t in r["task_loss"]}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_s"} | tasks <= tags, tags
    for tag in ("loss", "grad_norm", "mfu"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["step"], float(np.float32(r[tag]))) for r in logged]

    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
