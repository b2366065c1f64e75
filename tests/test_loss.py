"""The chunked loss (labelled positions only, head and cross-entropy a block of slots x head rows at a time)
against the plain full-logits loss it replaces, kept here as the reference: equal losses and gradients for both
objectives, with and without user speech, and no [tokens, vocab] array anywhere in the compiled step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_train_data import LAYOUT, LAYOUTS, tokenize

from omnidiff_jax.attention import segment_ids_from_positions
from omnidiff_jax.config import dream_config, get_config
from omnidiff_jax.models.dream import Dream
from omnidiff_jax.sharding import activate, logical_to_spec, make_mesh
from omnidiff_jax.speech_in import init_speech_input
from omnidiff_jax.train import data, loss
from omnidiff_jax.train.data import IGNORE
from omnidiff_jax.train.speech import speech_encoder

LENGTH, CHUNK = 256, 8
VOCAB_CHUNK = 100  # does not divide the vocabulary (384): the last row block repeats 16 rows of the one before


def full_logits_loss(module, params, batch, objective, speech=None, frozen=None):
    """The loss as it was: float32 logits [B, L, V] at every position, CE against the next label."""
    x = loss.embed_inputs(module, params, batch, speech, frozen)
    positions = batch["positions"]
    logits = module.apply({"params": params["dream"]}, inputs_embeds=x, positions=positions,
                          segment_ids=segment_ids_from_positions(positions), query_valid=batch["valid"])
    losses = logits_losses(logits, batch["labels"], batch["mask_prob"], objective)
    return losses.mean(), losses


def logits_losses(logits, labels, prob, objective):
    """Per-pack loss [B] of logits [B, L, V]: the removed `pack_losses`, verbatim in its arithmetic."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    if objective == "reference":
        return ce.sum(-1) / jnp.maximum(valid.sum(-1), 1)
    prob = prob[:, 1:]
    return jnp.where(valid, ce / jnp.where(valid, prob, 1.0), 0.0).sum(-1) / jnp.maximum((prob > 0).sum(-1), 1)


def packs(tasks, max_audios=0, max_frames=0, seed=0):
    """One pack per entry of `tasks` (each a list of sample kinds), corrupted as in training."""
    rng = np.random.default_rng(seed)
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    spec = data.PackSpec(LENGTH, LAYOUT.pad, max_audios, max_frames)
    out = [spec.pack([corruption(tokenize(LAYOUTS[t]), rng) for t in kinds], 0) for kinds in tasks]
    return {k: jnp.asarray(np.stack([p[k] for p in out])) for k in out[0] if k != "task"}


@pytest.fixture(scope="module")
def dream():
    module = Dream(dream_config(get_config("tiny")))
    init = lambda k: nn.meta.unbox(module.init(k, jnp.zeros((1, 8), jnp.int32))["params"])  # noqa: E731
    return module, jax.jit(init)(jax.random.key(0))


def rel_err(got, want):
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()))


def head_inputs(seed, batch=3, vocab=LAYOUT.vocab_size, hidden=64, fill=0.3):
    """Random final hidden states [B, L, H], head [V, H], labels [B, L] (a `fill` share labelled, pack 1 with
    none) and masking probabilities."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((batch, LENGTH)) < fill, rng.integers(0, vocab, (batch, LENGTH)), IGNORE)
    labels[1] = IGNORE
    prob = np.where(labels != IGNORE, rng.uniform(0.05, 1.0, labels.shape), 0.0)
    prob[rng.random(labels.shape) < 0.2] = 0.5  # eligible but unmasked
    return (jnp.asarray(rng.normal(size=(batch, LENGTH, hidden)), jnp.float32),
            jnp.asarray(rng.normal(size=(vocab, hidden)) * 0.3, jnp.float32),
            jnp.asarray(labels, jnp.int32), jnp.asarray(prob, jnp.float32))


def full_logits_losses(hidden, table, labels, prob, objective):
    """`logits_losses` of the whole head's logits (as `Dream.logits` applies it) at every position."""
    return logits_losses(jnp.einsum("blh,vh->blv", hidden, table), labels, prob, objective)


def assert_same_loss_and_gradients(chunked, full, args):
    (got, got_packs), got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(*args)
    (want, want_packs), want_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(*args)
    np.testing.assert_allclose(got_packs, want_packs, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) <= 1e-6, rel_err(g, w)
        assert float(jnp.abs(g).max()) > 0
    return got_packs


@pytest.mark.parametrize("objective", ["reference", "inverse_t"])
@pytest.mark.parametrize("fill", [0.3, 1.0])  # 1.0: every position labelled, the whole capacity in use
def test_chunked_head_equals_the_full_logits(objective, fill):
    args = head_inputs(0, fill=fill)

    def chunked(hidden, table, labels, prob):
        losses, _ = loss.pack_losses(hidden, table, labels, prob, objective, chunk=CHUNK, vocab_chunk=VOCAB_CHUNK)
        return losses.mean(), losses

    def full(*args):
        losses = full_logits_losses(*args, objective)
        return losses.mean(), losses

    pack_loss = assert_same_loss_and_gradients(chunked, full, args)
    assert pack_loss[1] == 0  # the pack with no label


@pytest.mark.slow
@pytest.mark.parametrize("objective,with_speech", [("inverse_t", False), ("reference", True)])
def test_batch_loss_equals_the_full_logits_path(dream, objective, with_speech):
    """The whole micro-batch loss (embeddings, user speech, Dream, head) and its gradients for every trainable
    tree, projector included."""
    module, dream_params = dream
    params, speech, frozen = {"dream": dream_params}, None, None
    if with_speech:
        speech = speech_encoder(init_speech_input(), max_audios=4, max_frames=8)
        params, frozen = {**params, **speech.params}, speech.frozen
        batch = packs([["asr", "s2i"], ["asr", "tts"]], 4, 8)
    else:
        batch = packs([["t2i", "tts", "vqa"], ["vqa", "t2i"]])

    def chunked(p):
        mean, aux = loss.batch_loss(module, p, batch, objective, speech, frozen)
        return mean, aux["pack_loss"]

    (got, got_packs), got_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (want, want_packs), want_grads = jax.jit(jax.value_and_grad(
        lambda p: full_logits_loss(module, p, batch, objective, speech, frozen), has_aux=True))(params)
    np.testing.assert_allclose(got_packs, want_packs, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got_grads)[0], jax.tree.leaves(want_grads)
    assert len(flat_got) == len(flat_want) == len(jax.tree.leaves(params))
    for (path, g), w in zip(flat_got, flat_want):
        assert rel_err(g, w) <= 1e-6, (jax.tree_util.keystr(path), rel_err(g, w))
    if with_speech:
        assert float(jnp.abs(jax.tree.leaves(got_grads["audio_projection"])[0]).max()) > 0


def test_every_label_has_a_slot_however_full_the_pack():
    """A pack labelled at every position fills the whole capacity; the slots are the labelled positions in
    order, then IGNORE."""
    labels = np.full((3, 40), IGNORE, np.int32)
    labels[0] = np.arange(40)  # every position labelled: 39 shifted labels
    labels[1, [3, 7, 8, 30]] = [5, 6, 7, 8]
    order, targets = loss.supervised_slots(jnp.asarray(labels), 16)
    assert order.shape == targets.shape == (3, 48)
    np.testing.assert_array_equal(order[0, :39], np.arange(39))
    np.testing.assert_array_equal(targets[0, :39], np.arange(1, 40))
    np.testing.assert_array_equal(order[1, :4], [2, 6, 7, 29])
    np.testing.assert_array_equal(targets[1, :4], [5, 6, 7, 8])
    assert (targets[0, 39:] == IGNORE).all() and (targets[1, 4:] == IGNORE).all() and (targets[2] == IGNORE).all()


def test_no_tokens_by_vocab_array_in_the_compiled_gradient():
    """The only float32 arrays with a vocabulary axis in the compiled loss + gradient are the head's table [V, H]
    and its gradient, never the pack's logits [B, L - 1, V] nor a chunk's [B, chunk, V]."""
    hidden, table, labels, prob = head_inputs(1)
    (b, _, h), vocab = hidden.shape, table.shape[0]

    def largest(fn):
        text = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, table).compile().as_text()
        shapes = [[int(d) for d in dims.split(",")] for dims in re.findall(r"f32\[([\d,]+)\]", text)]
        return max(np.prod(s) for s in shapes if vocab in s)

    assert largest(lambda x, w: loss.pack_losses(x, w, labels, chunk=CHUNK, vocab_chunk=VOCAB_CHUNK)[0].mean()) \
        == vocab * h
    assert largest(lambda x, w: full_logits_losses(x, w, labels, prob, "reference").mean()) >= b * (LENGTH - 1) * vocab


@pytest.mark.parametrize("data,fsdp,tensor", [(2, 4, 1), (2, 2, 2)])
def test_the_head_split_over_a_mesh_equals_one_device(data, fsdp, tensor):
    """Under an 8-device mesh each device scores its own packs (one of them without labels) against row blocks
    of the head gathered from its shards (hidden axis over fsdp, vocabulary over tensor); loss and gradients are
    those of the unsplit computation, the head's gradient comes back split as the head is, and no device ever
    holds the whole head or its whole gradient."""
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    hidden, table, labels, prob = head_inputs(2, batch=8)
    hidden = jax.device_put(hidden, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    head = NamedSharding(mesh, logical_to_spec(("vocab", "embed"), table.shape, mesh))
    table = jax.device_put(table, head)

    def mean_loss(x, w):
        return loss.pack_losses(x, w, labels, prob, "inverse_t", chunk=CHUNK, vocab_chunk=VOCAB_CHUNK)[0].mean()

    def on_mesh(x, w):
        with activate(mesh):
            return mean_loss(x, w)

    step = jax.jit(jax.value_and_grad(on_mesh, argnums=(0, 1)))
    got, got_grads = step(hidden, table)
    want, want_grads = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))(hidden, table)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) <= 1e-6
    assert got_grads[1].sharding.is_equivalent_to(head, 2)
    shapes = re.findall(r"\[([\d,]+)\]", step.lower(hidden, table).compile().as_text())
    vocab, h = table.shape
    assert f"{vocab},{h}" not in shapes and f"{VOCAB_CHUNK},{h}" in shapes  # row blocks only, gathered whole
