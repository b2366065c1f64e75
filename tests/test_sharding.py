"""Sharding on the test session's 8 fake CPU devices: parameters land sharded by the logical rules, and the
sharded forward equals the single-device forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from torch_ref import dream as ref

import omnidiff_jax
from omnidiff_jax.config import dream_config, get_config
from omnidiff_jax.models import abstract_params
from omnidiff_jax.models.dream import Dream
from omnidiff_jax.sharding import LOGICAL_RULES, make_mesh


def test_sharded_forward_equals_single_device(tmp_path):
    assert jax.device_count() == 8, jax.devices()
    c = ref.tiny_hf_config()
    folder = ref.save_hf(ref.random_dream(c, seed=3), tmp_path / "ckpt", c, shards=2)
    single = omnidiff_jax.load_model(folder)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = omnidiff_jax.load_model(folder, mesh=mesh)
    p = sharded.params
    layer = p["layers"][1]  # the inference layout: one tree per layer, each sharded like its slice of the stack
    specs = {
        "embed": p["embed_tokens"]["embedding"].sharding.spec,
        "q": layer["self_attn"]["q_proj"]["kernel"].sharding.spec,
        "kv": layer["self_attn"]["k_proj"]["kernel"].sharding.spec,
        "o": layer["self_attn"]["o_proj"]["kernel"].sharding.spec,
        "gate": layer["mlp"]["gate_proj"]["kernel"].sharding.spec,
        "down": layer["mlp"]["down_proj"]["kernel"].sharding.spec,
        "head": p["lm_head"]["embedding"].sharding.spec,
        "norm": p["norm"]["weight"].sharding.spec,
    }
    want = {
        "embed": P("tensor", "fsdp"), "q": P("fsdp", "tensor", None), "kv": P("fsdp", "tensor", None),
        "o": P("tensor", None, "fsdp"), "gate": P("fsdp", "tensor"), "down": P("tensor", "fsdp"),
        "head": P("tensor", "fsdp"), "norm": P(None),
    }
    assert specs == want
    shard_shape = layer["mlp"]["gate_proj"]["kernel"].addressable_shards[0].data.shape
    full_shape = layer["mlp"]["gate_proj"]["kernel"].shape
    assert shard_shape == (full_shape[0] // 2, full_shape[1] // 2), (shard_shape, full_shape)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, single.config.vocab_size, (4, 16))
    pos = np.concatenate([np.arange(6), np.arange(10)])[None].repeat(4, 0)
    mask = np.ones((4, 16), np.int32)
    mask[1, -3:] = 0
    for kw in ({}, {"position_ids": pos, "attention_mask": mask}):
        a = np.asarray(single.logits(ids, **kw))
        b = np.asarray(sharded.logits(ids, **kw))
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-5
    # a mesh axis that does not divide a dimension falls back to replication instead of failing
    odd = omnidiff_jax.load_model(folder, mesh=make_mesh(data=1, fsdp=1, tensor=8))
    assert odd.params["layers"][0]["self_attn"]["k_proj"]["kernel"].sharding.spec == P(None, None, None)
    assert odd.params["lm_head"]["embedding"].sharding.spec == P("tensor", None)
    b = np.asarray(odd.logits(ids))
    assert np.abs(np.asarray(single.logits(ids)) - b).max() / np.abs(b).max() < 1e-5


def test_make_mesh_errors():
    one = jax.devices()[:1]
    with pytest.raises(ValueError, match="does not match the 1 available devices"):
        make_mesh(data=2, fsdp=1, tensor=1, devices=one)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)
    assert make_mesh(devices=one).shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_every_logical_axis_used_by_the_model_has_a_rule():
    dream = Dream(dream_config(get_config("tiny")))
    specs = nn.get_partition_spec(abstract_params(dream, jnp.zeros((1, 8), jnp.int32)))
    names = {n for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             for n in spec if n is not None}
    assert names <= dict(LOGICAL_RULES).keys(), names - dict(LOGICAL_RULES).keys()
