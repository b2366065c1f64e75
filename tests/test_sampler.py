"""Sampler parity: our jitted sampler against the PyTorch transcription of the reference `_sample` loop
(tests/torch_ref/sampler.py), both driven by the same tiny Dream weights read from a real safetensors folder
through our converter, in float32. Plus batching, the sampling modes (statistically), the prefix cache, the
schedule rules of the reference, bad input, the mesh and the adaptive-length helpers (the `generate` command's
tests are in test_pipeline.py).

The fixture model's lm_head is scaled by 3 so that top-p 0.9 keeps ~20 tokens (it is exercised) and no masked
row is left with a single token (which would make whole groups of positions tie at confidence 0 or 1, where
torch's top-k order is unspecified).
"""

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import omnidiff_jax
from omnidiff_jax import adaptive_length, sampler_loop
from omnidiff_jax.models.dream import decode_functions
from omnidiff_jax.sampler import ALGS, Prompt, boa_index, sample, schedule
from omnidiff_jax.sampler_loop import Knobs, Variant, chunked_top_k, program
from omnidiff_jax.sampler_plan import as_prompt, make_plan
from omnidiff_jax.sharding import make_mesh
from torch_ref import dream as dream_ref
from torch_ref.sampler import reference_sample, sample_tokens, top_p_filter

P, N, STEPS, BLOCK = 12, 128, 8, 32  # N > 100 so the position penalty acts; 16 tokens per step
FEATURE_COLUMNS = np.arange(3, 7)  # prompt columns whose embeddings are overwritten (as speech features are)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference loop is host-bound; threads only contend on this small machine
    c = dream_ref.tiny_hf_config()
    tm = dream_ref.random_dream(c, seed=1)
    with torch.no_grad():
        tm.lm_head.weight.mul_(3.0)
    folder = dream_ref.save_hf(tm, tmp_path_factory.mktemp("sampler"), c)
    jm = omnidiff_jax.load_model(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, P).astype(np.int32)
    feats = rng.normal(size=(FEATURE_COLUMNS.size, c["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        embeds = tm.model.embed_tokens(torch.tensor(ids)[None]).clone()
        embeds[0, FEATURE_COLUMNS] = torch.tensor(feats)
    yield tm, jm, Prompt(ids, feats, FEATURE_COLUMNS), embeds, folder
    torch.set_num_threads(threads)


def reference(setup, **kw):
    tm, jm, prompt, embeds, _ = setup
    kw.setdefault("uncond_ids", prompt.ids[:8])
    x, histories = reference_sample(tm, embeds, mask_id=jm.config.mask_token_id, boa_id=jm.layout.begin_of_audio,
                                    **kw)
    return x[0, P:].numpy(), np.stack([h[0, P:].numpy() for h in histories])


CASES = list(itertools.product(["origin", "maskgit_plus", "topk_margin", "entropy", "entropy-penalty"],
                               ["one block", "blocks"], ["no penalties", "penalties"], ["no BOA", "BOA"],
                               [0.0, 1.0]))


@pytest.mark.parametrize("alg,blocks,penalties,boa,cfg_scale", CASES)
def test_tokens_match_the_reference_loop(setup, alg, blocks, penalties, boa, cfg_scale):
    _, jm, prompt, _, _ = setup
    # origin draws its transfers at random; with one step per block it commits every mask at once, deterministically
    steps = (4 if blocks == "blocks" else 1) if alg == "origin" else STEPS
    options = dict(gen_length=N, steps=steps, alg=alg, block_size=BLOCK if blocks == "blocks" else -1)
    if penalties == "penalties":
        options.update(repeat_penalty=1.5, max_position_penalty=2.0)
    want, _ = reference(setup, add_boa=boa == "BOA", cfg=cfg_scale, **options)
    got = sample(jm, [prompt], boa_prefill=boa == "BOA", uncond=[prompt.ids[:8]] if cfg_scale else None,
                 cfg_compat=True, cfg_scale=cfg_scale, **options)[0]
    assert got.dtype == np.int32 and got.shape == (N,)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "entropy-penalty"])
def test_sampling_math_on_bfloat16_logits_is_bit_exact(alg):
    # The released model's logits are bf16 and the reference does the whole filter/penalty/softmax/entropy chain
    # in bf16: feed the same bf16 rows to both (130 rows, so the position penalty acts).
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(130, 384)) * 3).astype(np.float32)
    past = torch.tensor([5, 7, 9, 0, 234, 100])  # 0 and the mask id are never penalised
    generated = np.zeros((1, 384), bool)
    generated[0, [5, 7, 9, 100]] = True
    penalty = 1.5 if alg == "entropy-penalty" else 1.0
    want_conf, want_x0 = sample_tokens(
        torch.tensor(logits).to(torch.bfloat16), 0.0, 0.9, 50, margin=alg == "topk_margin",
        neg_entropy=alg.startswith("entropy"), repeat_penalty=penalty, max_position_penalty=2.0, past_x=past,
        mask_id=234)
    knobs = Knobs(alg=np.int32(ALGS.index(alg)), temperature=np.float32(0), top_p=np.float32(0.9),
                  alg_temp=np.float32(0), cfg_scale=np.float32(0), repeat_penalty=np.float32(penalty),
                  max_position_penalty=np.float32(2.0), threshold=np.float32(0))
    rows = jax.jit(functools.partial(sampler_loop.sample_tokens, top_k=50))
    x0, conf = rows(jnp.asarray(logits, jnp.bfloat16)[None], jnp.arange(130)[None], jnp.array([130]), generated,
                    knobs, np.float32(penalty), jnp.zeros((1, 130, 66)))
    np.testing.assert_array_equal(np.asarray(x0[0]), want_x0.numpy())
    np.testing.assert_array_equal(np.asarray(conf[0], np.float32), want_conf.float().numpy())


def transfer_counts(gen_length, steps, boa=False):
    counts, m = [], gen_length - boa
    for _, _, ratio, last in schedule(gen_length, steps, None, boa):
        if m == 0:
            break  # no mask left: the reference stops
        counts.append(m if last else max(int(np.float32(m) * ratio), 1))
        m -= counts[-1]
    return counts


def test_last_layer_on_chosen_columns_is_the_whole_pass_there(setup):
    """The exact loop's model split (decode_functions: trunk, then last_layer on the columns a step reads) gives the
    final hidden states of a pass over the whole canvas at those columns, rows with left padding included."""
    jm = setup[1]
    model = decode_functions(jm.config)
    rng = np.random.default_rng(3)
    length, pads = 40, np.array([0, 5])
    embeds = model.embed(jm.params, jnp.asarray(rng.integers(0, 200, (2, length))))
    segments = (np.arange(length)[None] < pads[:, None]).astype(np.int32)
    positions = np.maximum(np.arange(length)[None] - pads[:, None], 0)
    whole = np.asarray(model.hidden(jm.params, embeds, positions, segments))
    columns = np.stack([np.sort(rng.choice(np.arange(5, length), 24, replace=False)) for _ in range(2)])
    trunk = model.trunk(jm.params, embeds, positions, segments)
    got = np.asarray(model.last_layer(jm.params, trunk, positions, segments, jnp.asarray(columns)))
    np.testing.assert_allclose(got, np.take_along_axis(whole, columns[..., None], axis=1), rtol=1e-5, atol=1e-5)


def test_schedule_follows_the_spec():
    # `generation_utils.py`: N = S gives 1 token per step; N = 2S gives 1, 2, ..., 2, 3; N = 21, S = 10 gives 2 x 9, 3;
    # 127 masks (BOA) in 128 steps: 1 per step, stopping after step 127
    assert transfer_counts(8, 8) == [1] * 8 and transfer_counts(260, 260) == [1] * 260
    assert transfer_counts(50, 25) == [1] + [2] * 23 + [3] and transfer_counts(16, 8) == [1] + [2] * 6 + [3]
    assert transfer_counts(21, 10) == [2] * 9 + [3]
    assert transfer_counts(128, 128, boa=True) == [1] * 127
    assert boa_index(57, 128) == 25  # Omni-Diffusion `generation_utils.py`: N = 128 puts BOA at P + 25
    assert len(schedule(10, 10, 4, False)) == 4 + 4 + 2  # S_b = int(len_b / N * S), restarted per block


def test_batch_rows_equal_single_rows_and_history_matches_step_by_step(setup):
    _, jm, prompt, _, _ = setup
    prompts = [prompt, Prompt(prompt.ids[:5]), Prompt(np.arange(40, 56, dtype=np.int32))]
    lengths, steps = [128, 120, 113], [16, 12, 9]
    options = dict(alg="entropy-penalty", repeat_penalty=1.3, max_position_penalty=1.5, block_size=48)
    batch, history = sample(jm, prompts, gen_length=lengths, steps=steps, return_history=True, **options)
    _, want = reference(setup, gen_length=N, steps=16, **options)
    np.testing.assert_array_equal(history[0], want)
    loop = program(decode_functions(jm.config), None, Variant(jm.config.mask_token_id, jm.config.vocab_size, 50, False,
                                                             None, None, False))
    for r in range(3):
        single = sample(jm, [prompts[r]], gen_length=lengths[r], steps=steps[r], **options)[0]
        assert batch[r].shape == (lengths[r],) and history[r].shape[1] == lengths[r]
        np.testing.assert_array_equal(batch[r], single)
        np.testing.assert_array_equal(history[r][-1], single)
        compiled = compiled if r else loop._cache_size()
    assert loop._cache_size() == compiled  # 3 prompt and 3 generation lengths, one bucket: no recompilation


def test_aligned_cfg_equals_running_the_unconditional_row_alone(setup):
    # Aligned CFG mixes each generated position with the same position of `uncond ++ generation`; check one step
    # against logits computed independently with the torch model.
    tm, jm, prompt, embeds, _ = setup
    un = prompt.ids[:5]
    got = sample(jm, [prompt], gen_length=N, steps=1, cfg_scale=1.5, uncond=[un])[0]  # top-p/top-k keep the argmax
    mask = jm.config.mask_token_id
    with torch.no_grad():
        def shifted(e):
            logits = tm.forward_dream(inputs_embeds=e)
            return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        gen = tm.model.embed_tokens(torch.full((1, N), mask))
        cond = shifted(torch.cat([embeds, gen], 1))[0, P:]
        uncond = shifted(torch.cat([tm.model.embed_tokens(torch.tensor(un)[None]), gen], 1))[0, un.size:]
        want = (uncond + 2.5 * (cond - uncond)).argmax(-1).numpy()
    np.testing.assert_array_equal(got, want)


def test_sampling_modes_follow_their_distributions(setup):
    tm, jm, prompt, embeds, _ = setup
    rows, n = 256, 16
    # one step of entropy decoding with temperature 0.7 and alg_temp 0.5 (and top-p alone, the full-vocabulary
    # filter path): the committed position is drawn from softmax(-entropy / 0.5) and its token from the
    # filtered, tempered distribution of that position
    _, history = sample(jm, [prompt] * rows, gen_length=n, steps=n, alg="entropy", temperature=0.7, alg_temp=0.5,
                        top_k=None, seed=3, return_history=True)
    first = np.stack([h[0] for h in history])  # [rows, n]
    mask = jm.config.mask_token_id
    committed = first != mask
    assert committed.sum(1).max() == 1
    first, committed = first[committed.any(1)], committed[committed.any(1)]  # drop rows that drew the mask id
    rows = len(first)
    assert rows > 200
    with torch.no_grad():
        x = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.full((1, n), mask)], 1)
        e = tm.model.embed_tokens(x)
        e[:, :P] = embeds
        logits = tm.forward_dream(inputs_embeds=e)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)[0, P:]
        neg_entropy, _ = sample_tokens(logits.clone(), 0.7, 0.9, None, neg_entropy=True)
        probs = torch.softmax(top_p_filter(logits / 0.7, 0.9), -1).numpy()
    want_pos = torch.softmax(neg_entropy / 0.5, -1).numpy()
    got_pos = np.bincount(committed.argmax(1), minlength=n) / rows
    assert 0.5 * np.abs(got_pos - want_pos).sum() < 0.12  # total variation; ~0.05 expected at 256 draws
    pos = committed.argmax(1)
    tokens = first[np.arange(rows), pos]
    assert (probs[pos, tokens] > 0).all()  # only tokens that survive top-p and top-k
    top_hits = (tokens == probs[pos].argmax(1)).sum()
    expected = probs[pos].max(1).sum()
    assert abs(top_hits - expected) < 4 * np.sqrt(expected), (top_hits, expected)

    # origin: each masked position is committed at step 0 with probability 1 - t1/t0 = 0.999/4
    rows = 256
    options = dict(gen_length=n, steps=4, alg="origin", top_k=None, seed=4, return_history=True)
    tokens, history = sample(jm, [prompt] * rows, **options)
    rate = np.mean([(h[0] != mask).mean() for h in history])
    assert abs(rate - 0.999 / 4) < 4 * np.sqrt(0.25 * 0.75 / (rows * n))
    again, _ = sample(jm, [prompt] * rows, **options)
    assert all((a == b).all() for a, b in zip(tokens, again))  # deterministic for a seed
    other, _ = sample(jm, [prompt] * rows, **{**options, "seed": 5})
    assert not all((a == b).all() for a, b in zip(tokens, other))


def test_prefix_cache_sampler(setup):
    _, jm, prompt, _, _ = setup
    # blocks of one step each refresh the cache at every step: identical to the exact sampler
    options = dict(gen_length=N, steps=4, block_size=BLOCK, alg="entropy")
    np.testing.assert_array_equal(sample(jm, [prompt], prefix_cache=True, **options)[0],
                                  sample(jm, [prompt], **options)[0])
    cached = sample(jm, [prompt], gen_length=N, steps=STEPS, prefix_cache=True)[0]
    assert (cached != jm.config.mask_token_id).all()


def first_step_logits(tm, embeds, n, mask):
    """The reference's shifted logits [n, V] of the generation region at the first step (every position masked)."""
    with torch.no_grad():
        x = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.full((1, n), mask)], 1)
        e = tm.model.embed_tokens(x)
        e[:, :P] = embeds
        logits = tm.forward_dream(inputs_embeds=e)
        return torch.cat([logits[:, :1], logits[:, :-1]], 1)[0, P:]


def test_threshold_decoding_commits_the_confident_masks_and_at_least_one(setup):
    tm, jm, prompt, embeds, _ = setup
    n, block = 64, 16
    # step 0: exactly the block's masks whose x0 (after top-p / top-k) has probability > tau are committed
    probability, x0 = sample_tokens(first_step_logits(tm, embeds, n, jm.config.mask_token_id)[:block], 0.0, 0.9,
                                     50)
    tau = float(np.sort(probability.numpy())[block // 2 - 1:block // 2 + 1].mean())  # half the block is above
    got, history = sample(jm, [prompt], gen_length=n, steps=1, block_size=block, threshold=tau,
                          return_history=True)
    mask = jm.config.mask_token_id
    committed = history[0][0] != mask
    np.testing.assert_array_equal(committed[:block], probability.numpy() > tau)
    assert not committed[block:].any()
    np.testing.assert_array_equal(history[0][0][:block][committed[:block]], x0.numpy()[committed[:block]])
    # every step commits at least one mask, in the block of the first mask left, until none is left
    masks = np.concatenate([[n], (history[0] == mask).sum(1)])
    assert (np.diff(masks) <= -1).all() and masks[-1] == 0 and (got[0] != mask).all()
    for before, after in zip(np.concatenate([np.full((1, n), mask), history[0][:-1]]), history[0]):
        changed = np.flatnonzero(before != after)
        assert changed.min() // block == changed.max() // block == np.flatnonzero(before == mask).min() // block
    # a threshold no probability reaches: one commit per step; one every probability passes: one step per block
    _, strict = sample(jm, [prompt], gen_length=n, steps=1, block_size=block, threshold=0.999999,
                       return_history=True)
    assert len(strict[0]) == n
    loose, easy = sample(jm, [prompt], gen_length=n, steps=1, block_size=block, threshold=1e-9, return_history=True)
    assert len(easy[0]) == n // block
    exact = sample(jm, [prompt], gen_length=n, steps=n // block, block_size=block)  # the last step commits all
    np.testing.assert_array_equal(loose[0], exact[0])


def test_dual_cache_is_exact_when_every_step_starts_a_block_and_rows_stay_independent(setup):
    _, jm, prompt, _, _ = setup
    # one step per block: every step refreshes the cache, so the tokens are the exact sampler's
    options = dict(gen_length=N, steps=N // BLOCK, block_size=BLOCK, alg="entropy")
    np.testing.assert_array_equal(sample(jm, [prompt], dual_cache=True, **options)[0],
                                  sample(jm, [prompt], **options)[0])
    # within blocks the cache is stale (approximate), and each batch row is still computed alone, also when the
    # rows' blocks move on at different steps (threshold decoding)
    prompts = [prompt, Prompt(np.arange(40, 49, dtype=np.int32))]
    lengths = [N, 120]  # one compile bucket
    both = sample(jm, prompts, gen_length=lengths, steps=1, block_size=BLOCK, dual_cache=True, threshold=0.2)
    for r in range(2):
        alone = sample(jm, [prompts[r]], gen_length=lengths[r], steps=1, block_size=BLOCK, dual_cache=True,
                       threshold=0.2)[0]
        np.testing.assert_array_equal(both[r], alone)


def test_cosine_schedule_commits_maskgit_counts(setup):
    _, jm, prompt, _, _ = setup
    n, steps = 96, 6
    _, history = sample(jm, [prompt], gen_length=n, steps=steps, mask_schedule="cosine", return_history=True)
    left = (history[0] == jm.config.mask_token_id).sum(1)
    # MaskGIT: after step i of S, n cos(pi/2 (i + 1) / S) positions are still masked (up to the rounding of k)
    want = n * np.cos(np.pi / 2 * np.arange(1, steps + 1) / steps)
    assert len(left) == steps and left[-1] == 0
    np.testing.assert_allclose(left, want, atol=steps)
    assert (np.diff(np.concatenate([[n], left])) < 0).all()


@pytest.mark.parametrize("change,message", [
    (dict(prompts=[[]]), "non-empty"),
    (dict(prompts=[]), "at least one prompt"),
    (dict(gen_length=0), "gen_length must be an integer >= 1"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(alg="greedy"), "unknown alg 'greedy'"),
    (dict(prompts=[[1, 999]]), "token id 999"),
    (dict(cfg_scale=2.0), "needs `uncond`"),
    (dict(cfg_scale=2.0, uncond=[list(range(1, 20))], cfg_compat=True), "longer than prompts[0]"),
    (dict(gen_length=[4, 4]), "2 entries for 1 prompts"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(block_size=0), "block_size must be"),
    (dict(prompts=[Prompt([1, 2], np.zeros((1, 64)), [5])]), "embed_positions must lie in the prompt"),
    (dict(prefix_cache=True, dual_cache=True), "exclude each other"),
    (dict(threshold=1.0), "threshold must be in (0, 1)"),
    (dict(threshold=0.9, alg="origin"), "not with alg 'origin'"),
    (dict(mask_schedule="exp"), "mask_schedule must be one of"),
])
def test_bad_input_raises_clear_errors(setup, change, message):
    _, jm, _, _, _ = setup
    args = {"prompts": [[1, 2, 3]], "gen_length": 4, "steps": 4, **change}
    with pytest.raises(ValueError) as err:
        sample(jm, args.pop("prompts"), **args)
    assert message in str(err.value)


def test_prompt_plus_generation_beyond_the_models_positions(setup):
    _, jm, _, _, _ = setup
    short = dataclasses.replace(jm, config=jm.config.replace(max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"prompt \(3\) \+ gen_length \(14\) = 17 exceeds the model's maximum of 16"):
        sample(short, [[1, 2, 3]], gen_length=14, steps=4)
    assert sample(short, [[1, 2, 3]], gen_length=13, steps=4)[0].shape == (13,)  # exactly 16 positions fit


def test_mesh_matches_single_device_without_gathering_the_vocabulary(setup):
    folder = setup[4]
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    plain, sharded = omnidiff_jax.load_model(folder), omnidiff_jax.load_model(folder, mesh=mesh)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11], [12]]
    options = dict(gen_length=[16, 12, 9, 16], steps=8, alg="entropy-penalty", repeat_penalty=1.2)
    a = sample(plain, prompts, **options)
    b = sample(sharded, prompts, **options)
    assert all((x == y).all() for x, y in zip(a, b))

    cfg = sharded.config
    loop = program(decode_functions(cfg), mesh, Variant(cfg.mask_token_id, cfg.vocab_size, 50, False, None, None,
                                                        False))
    plan = make_plan(cfg, sharded.layout, [as_prompt(p, cfg, "p") for p in prompts], None, options["gen_length"],
                     [8] * 4, None, False, False)
    knobs = Knobs(alg=np.int32(4), temperature=np.float32(0), top_p=np.float32(0.9), alg_temp=np.float32(0),
                  cfg_scale=np.float32(0), repeat_penalty=np.float32(1.2), max_position_penalty=np.float32(1),
                  threshold=np.float32(0))
    text = loop.lower(sharded.params, plan, knobs, jax.random.key(0)).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", text)
    assert [s for s in shapes if s.endswith(str(cfg.vocab_size))] == []


def test_adaptive_lengths_follow_the_evaluation_scripts():
    # `tools/evaluate_asr.py`: 10 s of audio -> T_lfr 167 -> P ~ 187 -> N = 37, steps = 18
    asr = adaptive_length.asr(187)
    assert (asr["gen_length"], asr["steps"], asr["block_size"], asr["alg"]) == (37, 18, 37, "entropy")
    tts = adaptive_length.tts(11)
    assert (tts["gen_length"], tts["steps"], tts["alg"], tts["repeat_penalty"]) == (38, 19, "entropy-penalty", 1.2)
    assert adaptive_length.tts_text("Convert the text to speech.\n  Hello there. ") == "Hello there."
    with pytest.raises(ValueError, match="prompt_length"):
        adaptive_length.asr(4)


@pytest.mark.parametrize("levels", [3, 1000])  # heavy ties across chunk boundaries, and few
def test_chunked_top_k_equals_lax_top_k(levels):
    x = jax.random.randint(jax.random.key(levels), (4, 3, 1001), 0, levels).astype(jnp.float32)
    want = jax.lax.top_k(x, 7)
    got = chunked_top_k(x, 7, chunk=8)  # 126 chunks, the last one padded
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # a non-decreasing rescale that merges values into ties, applied by chunked_top_k to chunk maxima only
    coarse = lambda v: jnp.floor(v / 4)  # noqa: E731
    want, got = jax.lax.top_k(coarse(x), 7), chunked_top_k(x, 7, chunk=8, rescale=coarse)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("temperature,levels,top_p", [(0.0, 300, 0.9), (0.0, 10**6, 0.9), (0.5, 300, 0.9),
                                                       (0.5, 10**6, 1.0)])
def test_shortlist_is_the_stable_sort_head_with_vocabulary_chunks_and_a_split_vocabulary(temperature, levels, top_p):
    # 76,800 logits: `_top_k` works in chunks on CPU (600 of 128; 300 per device with the vocabulary split over
    # `tensor`); 300 levels tie heavily within and across chunks. Temperature 0 reads the logits as they are,
    # 0.5 scales them (exactly: x / 0.5 = 2x). Expected: numpy's stable descending sort and float64 logsumexp
    # (which only top-p < 1 reads).
    rng = np.random.default_rng(levels)
    logits = (rng.integers(0, levels, (4, 3, 76800)) / 8).astype(np.float32)
    scaled = logits * 2 if temperature else logits
    want_ids = np.argsort(-scaled, axis=-1, kind="stable")[..., :66]
    top = scaled.max(axis=-1, keepdims=True).astype(np.float64)
    want_lse = (top + np.log(np.exp(scaled - top).sum(axis=-1, keepdims=True)))[..., 0]
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    variant = Variant(0, logits.shape[-1], 50, False, None, None, False)
    knobs = Knobs(alg=np.int32(0), temperature=np.float32(temperature), top_p=np.float32(top_p),
                  alg_temp=np.float32(0), cfg_scale=np.float32(0), repeat_penalty=np.float32(1),
                  max_position_penalty=np.float32(1), threshold=np.float32(0))
    for shortlist in (functools.partial(sampler_loop._shortlist, vocab_axes=None),
                      sampler_loop._shortlister(mesh, variant, logits.shape[0])):
        values, ids, lse = jax.jit(shortlist, static_argnums=2)(logits, knobs, 66)
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(scaled, want_ids, axis=-1))
        if top_p < 1:
            np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy-penalty"])
def test_tokens_match_the_reference_loop_without_top_p(setup, alg):
    # top_p None: no logsumexp is computed (the nucleus keeps every candidate), the tokens are still the reference's
    _, jm, prompt, _, _ = setup
    options = dict(gen_length=N, steps=STEPS, alg=alg, block_size=BLOCK, top_p=None, repeat_penalty=1.5,
                   max_position_penalty=2.0)
    want, _ = reference(setup, **options)
    np.testing.assert_array_equal(sample(jm, [prompt], **options)[0], want)
