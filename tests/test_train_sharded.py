"""A train step on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2) equals the single-device step."""

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
from pathlib import Path

import jax
import numpy as np
import optax

jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, "tests")
from test_train_data import write_tiny_dataset

from omnidiff_jax.config import dream_config, get_config
from omnidiff_jax.convert.keymap import flatten
from omnidiff_jax.sharding import make_mesh
from omnidiff_jax.train import data
from omnidiff_jax.train.init import initial_params
from omnidiff_jax.train.trainer import Trainer

assert jax.device_count() == 8
root = Path(sys.argv[1])
write_tiny_dataset(root / "data")
cfg = get_config("configs/train_tiny.py")
cfg.data.root, cfg.train.workdir = str(root / "data"), str(root / "run")
cfg.train.micro_batch, cfg.optim.warmup_ratio = 4, 0.1  # lr 0, 0, then > 0
params = initial_params(cfg, dream_config(cfg))
results = {}
for name, mesh in (("single", make_mesh(devices=jax.devices()[:1])), ("sharded", make_mesh(2, 2, 2))):
    trainer = Trainer(cfg, mesh=mesh)
    state = trainer.init_state(params)
    it = trainer.data_iterator()
    losses = []
    for step in range(3):
        batch = trainer.device_batch(data.next_packs(it, 8))
        state, metrics = trainer.step_fn(state, batch, trainer.frozen)
        losses.append(float(metrics["loss"]))
        if step == 0:
            first_moment = flatten(jax.device_get(optax.tree.get(state.opt_state, "mu")))
    results[name] = flatten(jax.device_get(state.params)), first_moment, losses, state
single, sharded = results["single"], results["sharded"]
lm_head = sharded[3].params["dream"]["lm_head"]["kernel"]
assert lm_head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), lm_head.sharding
assert len(lm_head.addressable_shards) == 8 and lm_head.addressable_shards[0].data.shape == (32, 192)
assert batch["input_ids"].sharding.spec[1] == ("data", "fsdp")
np.testing.assert_allclose(sharded[2], single[2], rtol=1e-5)
for key, want in single[1].items():
    np.testing.assert_allclose(sharded[1][key], want, rtol=1e-4, atol=1e-7, err_msg=key)
for key, want in single[0].items():
    np.testing.assert_allclose(sharded[0][key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert not np.array_equal(want, flatten(params)[key]), key  # every parameter moved
print("OK")
"""


def test_sharded_step_equals_single_device(tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]
