"""Dream parity: our Flax model, loaded through the converter from a real safetensors folder, against our PyTorch
reference with the upstream state_dict names (tests/torch_ref/dream.py), in float32 at the highest precision."""

import copy
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import omnidiff_jax
from omnidiff_jax.convert.keymap import ConversionError
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.models.dream import (REMAT_POLICIES, Dream, KVCache, RMSNorm, decode_functions,
                                       stack_layers)
from torch_ref import dream as ref

RTOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    c = ref.tiny_hf_config()
    torch_model = ref.random_dream(c, seed=1)
    folder = ref.save_hf(torch_model, tmp_path_factory.mktemp("dream"), c, shards=3)
    return c, torch_model, omnidiff_jax.load_model(folder), folder


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def ids_for(c, shape, seed=0):
    return np.random.RandomState(seed).randint(0, c["vocab_size"], shape)


def test_full_attention_matches_forward_dream(pair):
    c, tm, jm, _ = pair
    ids = ids_for(c, (2, 24))
    with torch.no_grad():
        want = tm.forward_dream(torch.tensor(ids)).numpy()
    got = jm.logits(ids)
    assert got.dtype == jnp.float32 and got.shape == (2, 24, c["vocab_size"])
    assert rel_err(got, want) < RTOL


def test_packed_segments_with_padding_batch_of_two(pair):
    c, tm, jm, _ = pair
    ids = ids_for(c, (2, 20), seed=1)
    # row 0: segments of 6 and 14 with a 4-token pad tail that continues the last segment's positions;
    # row 1: three segments, no padding. The reference mask is only right at B=1; ours must be right at any B.
    pos = np.array([list(range(6)) + list(range(14)), list(range(5)) + list(range(8)) + list(range(7))])
    mask = np.ones((2, 20), np.int64)
    mask[0, -4:] = 0
    with torch.no_grad():
        want = tm.forward(torch.tensor(ids), torch.tensor(mask), torch.tensor(pos)).numpy()
        for b in range(2):  # the batched torch reference agrees with per-row calls (B=1, the reference setting)
            one = tm.forward(torch.tensor(ids[b:b + 1]), torch.tensor(mask[b:b + 1]), torch.tensor(pos[b:b + 1]))
            np.testing.assert_allclose(one.numpy()[0], want[b], rtol=0, atol=1e-5)
    got = np.asarray(jm.logits(ids, position_ids=pos, attention_mask=mask))
    assert rel_err(got, want) < RTOL
    # segments really are isolated: changing segment 1 leaves segment 2's logits unchanged ...
    ids2 = ids.copy()
    ids2[1, :5] = (ids2[1, :5] + 1) % c["vocab_size"]
    got2 = np.asarray(jm.logits(ids2, position_ids=pos, attention_mask=mask))
    np.testing.assert_array_equal(got2[1, 5:13], got[1, 5:13])
    assert np.abs(got2[1, :5] - got[1, :5]).max() > 1e-3
    # ... while pad keys stay visible to the last segment's real queries (the reference's key-side behaviour)
    ids3 = ids.copy()
    ids3[0, -1] = (ids3[0, -1] + 1) % c["vocab_size"]
    got3 = np.asarray(jm.logits(ids3, position_ids=pos, attention_mask=mask))
    assert np.abs(got3[0, 6:16] - got[0, 6:16]).max() > 1e-4


def test_padded_query_rows_attend_to_nothing(pair):
    """A padded query row's attention output is exactly 0 (PyTorch >= 2.5 SDPA), so its hidden state equals the
    residual + MLP path of the embedding alone, with no NaN."""
    c, _, jm, _ = pair
    ids = ids_for(c, (1, 10), seed=2)
    mask = np.ones((1, 10), np.int64)
    mask[0, 7:] = 0
    pos = np.arange(10)[None]
    out = np.asarray(jm.logits(ids, position_ids=pos, attention_mask=mask))
    assert np.isfinite(out).all()
    ids_b = ids.copy()
    ids_b[0, :7] = (ids_b[0, :7] + 3) % c["vocab_size"]  # padded rows must not see the real tokens
    out_b = np.asarray(jm.logits(ids_b, position_ids=pos, attention_mask=mask))
    np.testing.assert_array_equal(out[0, 7:], out_b[0, 7:])


def test_inputs_embeds_path(pair):
    c, tm, jm, _ = pair
    ids = ids_for(c, (2, 12), seed=3)
    embeds = np.asarray(jm.embed(ids)).copy()
    embeds[:, 3:6] = np.random.RandomState(4).randn(2, 3, c["hidden_size"]).astype(np.float32)  # "audio" rows
    with torch.no_grad():
        want = tm.forward_dream(inputs_embeds=torch.tensor(embeds)).numpy()
    assert rel_err(jm.logits(inputs_embeds=embeds), want) < RTOL


# ------------------------------------------------------------------------------------------ classic port mistakes

def _mistaken(tm, kind):
    """A copy of the torch reference with one classic porting mistake."""
    bad = copy.deepcopy(tm)
    if kind == "no_qkv_bias":
        with torch.no_grad():
            for layer in bad.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
    return bad


@pytest.mark.parametrize("kind", ["causal_mask", "no_qkv_bias", "interleaved_rope"])
def test_classic_mistakes_would_be_caught(pair, kind, monkeypatch):
    """Each mistake moves the reference far outside the parity tolerance that our model meets."""
    c, tm, jm, _ = pair
    ids = ids_for(c, (1, 16), seed=5)
    if kind == "causal_mask":
        sdpa = ref.F.scaled_dot_product_attention
        monkeypatch.setattr(ref.F, "scaled_dot_product_attention",
                            lambda q, k, v, attn_mask=None, **kw: sdpa(q, k, v, is_causal=True))
    if kind == "interleaved_rope":
        monkeypatch.setattr(ref, "rotate_half",
                            lambda x: torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2))
    bad = _mistaken(tm, kind)
    with torch.no_grad():
        want = bad.forward_dream(torch.tensor(ids)).numpy()
    got = np.asarray(jm.logits(ids))
    assert rel_err(got, want) > 100 * RTOL


def test_rmsnorm_cast_order_bf16():
    """bf16: normalise in fp32, cast to bf16, then multiply by the bf16 weight (bit-exact vs the reference);
    multiplying in fp32 before the cast gives different bits."""
    rng = np.random.RandomState(0)
    x = (rng.randn(4, 64) * 3).astype(ml_dtypes.bfloat16)
    w = (1 + 0.3 * rng.randn(64)).astype(ml_dtypes.bfloat16)
    norm = RMSNorm(1e-6, jnp.bfloat16, jnp.bfloat16)
    got = np.asarray(norm.apply({"params": {"weight": jnp.asarray(w)}}, jnp.asarray(x))).astype(np.float32)
    tnorm = ref.RMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        tnorm.weight.copy_(torch.tensor(w.astype(np.float32)))
        tx = torch.tensor(x.astype(np.float32)).to(torch.bfloat16)
        want = tnorm(tx).float().numpy()
        x32 = tx.float()
        wrong = (tnorm.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)))
        wrong = wrong.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got, want)
    assert (want != wrong).mean() > 0.05


def test_bf16_model_close_to_fp32(pair):
    c, tm, jm, folder = pair
    jm16 = omnidiff_jax.load_model(folder, dtype="bfloat16")
    assert jm16.params["lm_head"]["embedding"].dtype == jnp.bfloat16
    ids = ids_for(c, (2, 16), seed=6)
    a, b = np.asarray(jm.logits(ids)), np.asarray(jm16.logits(ids))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_remat_and_attention_backends_agree(pair):
    """The training layout (`Dream`: the layer scan, under each remat policy) gives the inference layout's logits
    (`OmniModel`: one layer after another)."""
    c, _, jm, folder = pair
    ids = ids_for(c, (1, 16), seed=7)
    base = np.asarray(jm.logits(ids))
    stacked = stack_layers(jm.params)
    for policy in REMAT_POLICIES:
        got = Dream(jm.config.replace(remat_policy=policy)).apply({"params": stacked}, jnp.asarray(ids))
        np.testing.assert_allclose(np.asarray(got), base, rtol=0, atol=1e-5)
    other = omnidiff_jax.load_model(folder, attention_impl="xla")
    np.testing.assert_allclose(np.asarray(other.logits(ids)), base, rtol=0, atol=1e-5)
    # cuDNN / splash run only on their platforms (scripts/gpu_check.sh compares cuDNN with XLA on a GPU)
    from omnidiff_jax.attention import auto_implementation
    assert auto_implementation(jnp.bfloat16) == {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}[jax.default_backend()]
    assert auto_implementation(jnp.float32) == ("splash" if jax.default_backend() == "tpu" else "xla")


@pytest.mark.slow
def test_gradients_flow_through_remat(pair):
    _, _, jm, folder = pair
    model = omnidiff_jax.load_model(folder, remat_policy="full")
    ids = jnp.asarray(ids_for({"vocab_size": model.config.vocab_size}, (1, 8), seed=8))

    def loss(params, m):
        return Dream(m.config).apply({"params": params}, ids).astype(jnp.float32).mean()

    g_remat = jax.grad(loss)(stack_layers(model.params), model)
    g_plain = jax.grad(loss)(stack_layers(jm.params), jm)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_kv_cache_windows_match_the_full_pass(pair):
    _, _, jm, _ = pair
    cfg = jm.config
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 24, cfg.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(24), (2, 24))
    segments = np.zeros((2, 24), np.int32)
    segments[1, 20:] = 1  # row 1 has 4 padding columns
    hidden = jax.jit(functools.partial(decode_functions(cfg).hidden, jm.params))
    want = Dream(cfg).apply({"params": stack_layers(jm.params)}, inputs_embeds=x, positions=positions,
                            segment_ids=segments, return_hidden=True)
    full, cache = hidden(x, positions, segments, cache=KVCache.empty(cfg, segments))
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    # windows of 8 columns at a different start per row, attending to the rest through the cache
    start = np.array([10, 7])
    window = lambda a: np.stack([a[r, s:s + 8] for r, s in enumerate(start)])  # noqa: E731
    part, updated = hidden(window(x), window(positions), window(segments), cache=cache, start=start)
    np.testing.assert_allclose(part, window(np.asarray(want)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated.k, cache.k, rtol=1e-5, atol=1e-6)  # the same tokens: the same keys
    # stale keys outside the window change the window's output (the cache is what it reads)
    stale = cache.replace(k=cache.k.at[:, :, :4].multiply(0.5))
    part_stale, _ = hidden(window(x), window(positions), window(segments), cache=stale, start=start)
    assert np.abs(np.asarray(part_stale) - np.asarray(part)).max() > 1e-3


# ------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_name_the_argument(pair):
    c, _, jm, _ = pair
    V = c["vocab_size"]
    with pytest.raises(ValueError, match=f"input_ids holds token id {V}, outside the vocabulary"):
        jm.logits(np.array([[1, V]]))
    with pytest.raises(ValueError, match="input_ids must have rank 2"):
        jm.logits(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(1, 3\)"):
        jm.logits(np.array([[1, 2, 3]]), position_ids=np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 3\)"):
        jm.logits(np.array([[1, 2, 3]]), attention_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        jm.logits(inputs_embeds=np.zeros((1, 3, 5), np.float32))
    with pytest.raises(ValueError, match="exactly one of"):
        jm.logits()
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        omnidiff_jax.init_model("huge")


def test_not_a_checkpoint_says_what_is_missing(tmp_path, pair):
    c, tm, _, folder = pair
    with pytest.raises(CheckpointError, match="no config.json"):
        omnidiff_jax.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        omnidiff_jax.load_model(tmp_path)


def test_key_problems_are_reported_together(tmp_path, pair):
    c, tm, _, _ = pair
    state = {k: v for k, v in tm.state_dict().items()
             if k not in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight")}
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, c["hidden_size"])
    state["model.extra.weight"] = torch.zeros(3)
    # a projector without its encoder: a partial speech input, reported with the rest (the importer's rule too)
    state["model.audio_projection.mlp.0.weight"] = torch.zeros(3, 3)

    class Holder(torch.nn.Module):
        def state_dict(self):
            return state

    ref.save_hf(Holder(), tmp_path, c)
    with pytest.raises(ConversionError) as err:
        omnidiff_jax.load_model(tmp_path)
    msg = str(err.value)
    for needle in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight", "model.extra.weight",
                   "shape mismatch for 'model.layers.0.self_attn.k_proj.weight'",
                   "model.audio_projection.mlp.0.weight"):
        assert needle in msg


def test_truncated_and_missing_shards(tmp_path, pair):
    c, tm, _, _ = pair
    folder = ref.save_hf(tm, tmp_path / "a", c, shards=2)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        omnidiff_jax.load_model(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard\\(s\\) that do not exist: {shard.name}"):
        omnidiff_jax.load_model(folder)
