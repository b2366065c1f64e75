"""Loss, optimizer and train step against our PyTorch transcription of the reference (float32), the schedule
against DeepSpeed's formula, vocabulary resizing, config overrides, and a tiny model that learns."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_train_data import LAYOUT, LAYOUTS, SIZES, TEXT, TOKENIZERS, write_tiny_dataset
from torch_ref import dream as dream_ref
from torch_ref import train_loss as ref

import omnidiff_jax
from omnidiff_jax.cli import main as omnidiff
from omnidiff_jax.config import apply_override, dream_config, get_config, load_config
from omnidiff_jax.convert.keymap import flatten
from omnidiff_jax.model import OmniModel, param_shardings
from omnidiff_jax.models.dream import stack_layers
from omnidiff_jax.sampler import sample
from omnidiff_jax.sharding import make_mesh
from omnidiff_jax.train import data, init, loss, optim
from omnidiff_jax.train.checkpoints import load_run_params
from omnidiff_jax.train.speech import speech_encoder
from omnidiff_jax.train.trainer import Trainer, flops_per_token

STEPS, LR = 300, 3e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared tiny dataset, a torch Dream with its HF folder, and one Trainer (one compiled step) reused."""
    root = tmp_path_factory.mktemp("train")
    records = write_tiny_dataset(root / "data")
    c = dream_ref.tiny_hf_config()
    folder = dream_ref.save_hf(dream_ref.random_dream(c, seed=3), root / "hf", c)
    cfg = get_config("configs/train_tiny.py")
    cfg.data.root = str(root / "data")
    cfg.train.workdir = str(root / "run")
    cfg.train.steps, cfg.train.accumulate, cfg.train.micro_batch = STEPS, "sum", 4
    cfg.train.checkpoint_every, cfg.train.log_every = 100, 10
    cfg.optim.lr, cfg.optim.warmup_ratio = LR, 0.02  # warmup over 6 updates
    return {"records": records, "c": c, "folder": folder, "cfg": cfg,
            "trainer": Trainer(cfg, mesh=make_mesh(devices=jax.devices()[:1]))}  # one of the session's 8 devices


def torch_pack(packs, i):
    return {"input_ids": torch.tensor(packs["input_ids"][i:i + 1]).long(),
            "labels": torch.tensor(packs["labels"][i:i + 1]).long(),
            "position_ids": torch.tensor(packs["positions"][i:i + 1]).long(),
            "attention_mask": torch.tensor(packs["valid"][i:i + 1]).long()}


def test_inverse_t_objective():
    """The 1/t extension: each masked token's CE over its masking probability, per supervised token."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 12, 7)).astype(np.float32)
    labels = np.where(rng.random((2, 12)) < 0.5, rng.integers(0, 7, (2, 12)), -100).astype(np.int32)
    prob = np.where(rng.random((2, 12)) < 0.8, rng.uniform(0.1, 1.0, (2, 12)), 0).astype(np.float32)
    prob[labels != -100] = np.maximum(prob[labels != -100], 0.05)
    got, count = loss.pack_losses(jnp.asarray(logits), jnp.eye(7), jnp.asarray(labels), jnp.asarray(prob),
                                  "inverse_t")  # an identity head: the hidden states are the logits
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).transpose(1, 2),
                                           torch.tensor(labels[:, 1:]).long(), ignore_index=-100,
                                           reduction="none").numpy()
    for i in range(2):
        labelled = labels[i, 1:] != -100
        want = (ce[i][labelled] / prob[i, 1:][labelled]).sum() / (prob[i, 1:] > 0).sum()
        np.testing.assert_allclose(got[i], want, rtol=1e-5)
    np.testing.assert_array_equal(count, (labels[:, 1:] != -100).sum(1))


def test_omni_init_starts_from_the_loaded_model_in_the_training_layout(setup):
    """init.kind "omni" reads the checkpoint as `load_model` does (per-layer) and hands training the stacked layers,
    laid out on the mesh when one is given."""
    cfg = copy.deepcopy(setup["cfg"])
    cfg.init.kind, cfg.init.path = "omni", str(setup["folder"])
    model_cfg = setup["trainer"].model_cfg
    want = flatten(stack_layers(omnidiff_jax.load_model(setup["folder"], dtype=model_cfg.param_dtype).params))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    for got in (init.initial_params(cfg, model_cfg), init.initial_params(cfg, model_cfg, mesh)):
        got = flatten(got["dream"])
        assert got.keys() == want.keys()
        for path, leaf in want.items():
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=path)
    shardings = flatten(param_shardings(model_cfg, mesh))
    assert all(got[p].sharding.is_equivalent_to(shardings[p], got[p].ndim) for p in got)
    assert got["layers/mlp/up_proj/kernel"].sharding.spec == shardings["layers/mlp/up_proj/kernel"].spec != jax.sharding.PartitionSpec()


def test_schedule_is_deepspeeds_with_the_off_by_one():
    schedule = optim.warmup_cosine(1e-5, 720, 24000)
    counts = [0, 1, 2, 3, 100, 719, 720, 721, 5000, 23999, 24000]
    want = [ref.deepspeed_lr(c, 1e-5, 720, 24000) for c in counts]
    np.testing.assert_allclose([float(schedule(c)) for c in counts], want, rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == float(schedule(1)) == 0.0
    np.testing.assert_allclose(float(schedule(2)), 1e-5 * np.log(2) / np.log(720), rtol=1e-5)
    np.testing.assert_allclose([float(schedule(720)), float(schedule(24000))], [1e-5, 1e-6], rtol=1e-5)


@pytest.mark.slow
def test_loss_and_updates_match_the_reference(setup):
    """Three updates (lr 0, 0, then warming up) of 2 accumulation steps x 4 packs: our step with
    accumulate='sum' against DeepSpeed's recipe in torch (per-pack mean CE, rank mean, accumulation sum,
    clip 1.0, AdamW, the padding_idx row frozen); the first step's pack losses against HF's loss."""
    trainer, c = setup["trainer"], setup["c"]
    model = omnidiff_jax.load_model(setup["folder"])
    state = trainer.init_state({"dream": stack_layers(model.params)})
    torch_model = dream_ref.random_dream(c, seed=3)
    adamw = torch.optim.AdamW(torch_model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    pad_row = np.asarray(model.params["embed_tokens"]["embedding"][LAYOUT.pad])
    it = trainer.data_iterator()
    for count in range(3):
        packs = it.next_packs(2, 4)  # 2 micro-batches of 4 packs
        micro = [[torch_pack(packs, i) for i in range(4 * m, 4 * m + 4)] for m in range(2)]
        if count == 0:
            assert (packs["positions"] == 0).sum() > 16  # several samples per pack
            with torch.no_grad():
                want = [ref.pack_loss(torch_model, p).item() for m in micro for p in m]
        state, metrics = trainer.step_fn(state, trainer.device_batch(packs), trainer.frozen)
        if count == 0:
            np.testing.assert_allclose(np.asarray(metrics["pack_loss"]).reshape(-1), want, rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(metrics["pack_tokens"]).reshape(-1),
                                          (packs["labels"] != -100).sum(1))
        lr = ref.deepspeed_lr(count, LR, 6, STEPS)
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6)
        ref.reference_update(torch_model, adamw, micro, lr)
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = state.params["dream"]
    np.testing.assert_allclose(params["embed_tokens"]["embedding"], state_dict["model.embed_tokens.weight"],
                               atol=2e-6)
    np.testing.assert_allclose(params["lm_head"]["embedding"], state_dict["lm_head.weight"], atol=2e-6)
    np.testing.assert_allclose(params["layers"]["mlp"]["up_proj"]["kernel"][1],
                               state_dict["model.layers.1.mlp.up_proj.weight"].T, atol=2e-6)
    assert not np.allclose(params["lm_head"]["embedding"], model.params["lm_head"]["embedding"], atol=1e-4)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"][LAYOUT.pad], pad_row)  # frozen row


@pytest.mark.slow
def test_tiny_model_learns_and_the_sampler_reproduces_targets(setup):
    trainer, cfg = setup["trainer"], setup["cfg"]
    state = trainer.run(progress=False)
    assert int(state.step) == STEPS
    logged = [json.loads(line) for line in open(f"{cfg.train.workdir}/metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(10, STEPS + 1, 10))
    first, last = logged[0]["loss"], np.mean([r["loss"] for r in logged[-5:]])
    assert last < 0.05 * first, (first, last)
    assert set(logged[-1]["task_loss"]) <= {"t2i", "tts", "vqa"} and logged[-1]["tokens_per_s"] > 0
    model = OmniModel(trainer.model_cfg, LAYOUT, jax.device_get(state.params["dream"]))
    template = data.ChatTemplate(TEXT, LAYOUT)
    prompts, targets = [], []
    for task in ("t2i", "tts", "vqa"):
        for record in setup["records"][task]:
            rec = data.parse_record(json.dumps(record), task, str(setup["cfg"].data.root) + "/raw")
            media = {r: TOKENIZERS.run(r.kind, r.size, [r.path])[0] for r in data.media_requests(rec, SIZES)}
            tokens = template.tokenize(rec, media, SIZES)
            start = int(np.flatnonzero(tokens["targets"] != -100)[0])
            prompts.append(tokens["input_ids"][:start])
            targets.append(tokens["input_ids"][start:])
    lengths = [len(t) for t in targets]
    outputs = sample(model, prompts, gen_length=lengths, steps=lengths)
    hits = sum(int((out == target).sum()) for out, target in zip(outputs, targets))
    assert hits / sum(lengths) > 0.95, hits / sum(lengths)


def test_resize_vocab_keeps_rows_and_draws_new_ones(tmp_path):
    c = dream_ref.tiny_hf_config(vocab_size=250)
    torch_model = dream_ref.random_dream(c, seed=0)
    folder = dream_ref.save_hf(torch_model, tmp_path / "base", c)
    cfg = dream_config(get_config("tiny"))
    params = init.load_dream_resized(folder, cfg, jax.random.key(0))
    embed, head = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(params["lm_head"]["embedding"])
    assert embed.shape == head.shape == (384, 64)
    np.testing.assert_array_equal(embed[:250], torch_model.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(head[:250], torch_model.lm_head.weight.detach().numpy())
    for new in (embed[250:], head[250:]):
        assert abs(new.std() - 0.02) < 0.002 and abs(new.mean()) < 0.002
    grown = init.resize_vocab(params, 390, jax.random.key(1))  # rounded up to a multiple of 8
    assert grown["embed_tokens"]["embedding"].shape == (392, 64)
    with pytest.raises(ValueError, match="shrink"):
        init.resize_vocab(params, 300, jax.random.key(1))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        init.load_dream_resized(folder, cfg.replace(num_layers=3), jax.random.key(0))


def test_config_overrides():
    cfg = load_config("configs/stage1.py", [("train.steps", "100"), ("optim.lr", "2e-5"),
                                            ("optim.freeze_pad_row", "false"), ("data.seq_len", "1024")])
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.freeze_pad_row, cfg.data.seq_len) == (100, 2e-5, False, 1024)
    assert cfg.optim.total_steps == 100  # follows train.steps
    apply_override(cfg, "data.sources.caption.jsonl", "['a.jsonl', 'b.jsonl']")
    assert cfg.data.sources.caption.jsonl == ["a.jsonl", "b.jsonl"]
    for field, text, message in (("train.nope", "1", "no such field"), ("train.steps", "x", "not a valid int"),
                                 ("nope.steps", "1", "no config section"), ("optim", "1", "section")):
        with pytest.raises(ValueError, match=message):
            apply_override(cfg, field, text)
    stage3 = get_config("configs/stage3.py")
    assert sorted(s.task for s in stage3.data.sources.values()) == ["asr", "s2i", "svqa", "t2i", "tts"]
    assert stage3.init.kind == "checkpoint" and stage3.data.max_audios > 0


def test_flops_per_token_counts_dense_and_attention():
    cfg = dream_config(get_config("tiny"))
    dense = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 64 * 384
    assert flops_per_token(cfg, 128) == 6 * dense + 12 * 2 * 128 * 64


def cli(args, workdir, env):
    return subprocess.Popen([sys.executable, "-m", "omnidiff_jax.cli", "train", "--no-progress", *args,
                             f"--config.train.workdir={workdir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(setup, tmp_path):
    """The CLI killed with SIGKILL right after its first checkpoint, then restarted: the final parameters and the
    losses after the restart equal those of an uninterrupted CLI run of the same config bit for bit (both on one
    CPU device, run side by side)."""
    cfg = setup["cfg"]
    args = ["--config", "configs/train_tiny.py", f"--config.data.root={cfg.data.root}",
            f"--config.train.steps={STEPS}", "--config.train.accumulate=sum", "--config.train.micro_batch=4",
            f"--config.optim.lr={LR}", "--config.optim.warmup_ratio=0.02", "--config.train.log_every=1",
            "--config.train.keep_checkpoints=2"]
    one_device = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "XLA_FLAGS": one_device, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    workdir, reference = tmp_path / "run", tmp_path / "uninterrupted"
    uninterrupted = cli(args + ["--config.train.checkpoint_every=100"], reference, env)
    first = cli(args + ["--config.train.checkpoint_every=10"], workdir, env)
    deadline = time.time() + 240
    while not list((workdir / "checkpoints").glob("[0-9]*")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, first.stdout.read()
    killed_at = max(json.loads(line)["step"] for line in open(workdir / "metrics.jsonl"))
    assert killed_at < STEPS
    second = cli(args + ["--config.train.checkpoint_every=100"], workdir, env)  # saving does not change the math
    for proc in (second, uninterrupted):
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out
    want = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    got = {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}
    assert sorted(got) == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert all(got[r["step"]]["loss"] == r["loss"] for r in want)
    resumed = flatten(load_run_params(workdir))
    for path, leaf in flatten(load_run_params(reference)).items():
        np.testing.assert_array_equal(resumed[path], leaf, err_msg=path)


def test_speech_features_reach_the_embeddings():
    """User speech in a pack: the encoder outputs land on the placeholders as the speech front end's own
    `scatter_audio` puts them, and the projector (trainable) gets finite, non-zero gradients."""
    from test_train_data import LAYOUTS, tokenize

    from omnidiff_jax.models.dream import Dream
    from omnidiff_jax.models.projector import ProjectorConfig
    from omnidiff_jax.models.sensevoice import SenseVoiceConfig
    from omnidiff_jax.speech_in import SpeechInput, encode, init_speech_input, scatter_audio

    speech = SpeechInput(SenseVoiceConfig.tiny(), ProjectorConfig.tiny(),
                         jax.jit(lambda: init_speech_input().params)())  # jitted: eager init is slow
    encoder = speech_encoder(speech, max_audios=4, max_frames=8)
    corruption = data.Corruption(LAYOUT.mask, LAYOUT.eos)
    rng = np.random.default_rng(0)
    samples = [corruption(tokenize(LAYOUTS[t]), rng) for t in ("asr", "s2i")]
    batch = {k: jnp.asarray(v)[None] for k, v in data.PackSpec(256, LAYOUT.pad, 4, 8).pack(samples, 0).items()
             if k != "task"}
    frames = [s["audio_frames"] for s in samples]
    feats = np.zeros((2, 8, data.FEATURE_DIM), np.float32)
    positions = np.full((2, 7), -1)
    offsets = [0, len(samples[0]["input_ids"])]
    for k, (s, off) in enumerate(zip(samples, offsets)):
        feats[k, :len(frames[k])] = frames[k]
        positions[k, :len(frames[k]) + 4] = off + s["audio_starts"][0] + np.arange(len(frames[k]) + 4)
    dream = Dream(dream_config(get_config("tiny")))
    init_dream = lambda k: nn.meta.unbox(dream.init(k, jnp.zeros((1, 8), jnp.int32))["params"])  # noqa: E731
    params = {"dream": jax.jit(init_dream)(jax.random.key(0)), **encoder.params}

    def total(p):
        embeds = loss.embed_inputs(dream, p, batch, encoder, encoder.frozen)
        weights = {"encoder": encoder.frozen["encoder"], "projector": p["audio_projection"]}
        clips = encode(weights, feats, np.array([len(f) for f in frames]), speech.encoder, speech.projector)[0]
        tokens = dream.apply({"params": p["dream"]}, batch["input_ids"], method=Dream.embed)
        return embeds.sum(), (embeds, scatter_audio(tokens, clips, positions), tokens)

    (_, (got, want, tokens)), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, tokens)
    for g in jax.tree.leaves(grads["audio_projection"]):
        assert np.isfinite(g).all() and np.abs(g).max() > 0



@pytest.mark.slow
def test_export_goes_through_the_converter(setup, tmp_path):
    setup["trainer"].run(progress=False)  # trained by the learning test; a no-op then
    workdir, dst = setup["cfg"].train.workdir, tmp_path / "hf"
    args = ["train", "--config", "configs/train_tiny.py", f"--config.train.workdir={workdir}", "--export", str(dst)]
    assert omnidiff(args) == 0
    exported, trained = omnidiff_jax.load_model(dst), load_run_params(workdir)["dream"]
    for path, leaf in flatten(trained).items():
        np.testing.assert_array_equal(flatten(stack_layers(exported.params))[path], leaf, err_msg=path)
    assert omnidiff(args) == 2  # the folder exists: refused without --force


def test_prepare_command(tmp_path, capsys):
    records = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
               for i in range(3)]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "oops\n")
    (tmp_path / "t2i.jsonl").write_text(json.dumps(LAYOUTS["t2i"]) + "\n")
    (tmp_path / "cat.png").write_bytes(b"")
    base = ["data", "prepare", "--config", "configs/train_tiny.py", "--no-progress",
            f"--config.data.root={tmp_path / 'out'}", f"--config.data.sources.vqa.jsonl=['{tmp_path / 'vqa.jsonl'}']",
            f"--config.data.sources.t2i.jsonl=['{tmp_path / 't2i.jsonl'}']",
            f"--config.data.sources.t2i.prefix={tmp_path}"]
    assert omnidiff(base + ["--source", "vqa"]) == 0
    out = capsys.readouterr().out
    assert '"samples": 3' in out and '"bad_record": 1' in out
    assert len(data.open_source(tmp_path / "out" / "vqa")) == 3
    assert omnidiff(base + ["--source", "t2i"]) == 2
    assert "prepare.image_tokenizer" in capsys.readouterr().err
    assert omnidiff(base + ["--source", "nope"]) == 2


@pytest.mark.slow
def test_sharded_step_equals_single_device(setup):
    """Three steps on the 8 fake CPU devices (data 2 x fsdp 2 x tensor 2) against the same steps on one device:
    losses, first moments and parameters agree to float32 reduction-order noise; a run's checkpoint restores
    sharded."""
    trainer, cfg = setup["trainer"], setup["cfg"]
    trainer.run(progress=False)  # the trained run whose checkpoint is restored sharded below
    sharded = Trainer(cfg, mesh=make_mesh(2, 2, 2))
    initial = init.initial_params(cfg, trainer.model_cfg)
    runs = []
    for t in (trainer, sharded):
        state, it = t.init_state(initial), t.data_iterator()
        losses = []
        for step in range(3):
            batch = t.device_batch(it.next_packs(2, 4))
            state, metrics = t.step_fn(state, batch, t.frozen)
            losses.append(float(metrics["loss"]))
            if step == 0:
                mu = flatten(jax.device_get(optax.tree.get(state.opt_state, "mu")))
        runs.append((losses, mu, state, batch))
    (losses, mu, state, _), (sharded_losses, sharded_mu, sharded_state, batch) = runs
    head = sharded_state.params["dream"]["lm_head"]["embedding"]
    assert head.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert head.addressable_shards[0].data.shape == (192, 32) and batch["labels"].sharding.spec[1] == ("data", "fsdp")
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
    for key, want in mu.items():
        np.testing.assert_allclose(sharded_mu[key], want, rtol=1e-4, atol=1e-8, err_msg=key)
    before, after = flatten(initial), flatten(jax.device_get(sharded_state.params))
    for key, want in flatten(jax.device_get(state.params)).items():
        np.testing.assert_allclose(after[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
        assert not np.array_equal(want, before[key]), key  # every parameter moved

    restored = load_run_params(cfg.train.workdir, shardings={"dream": param_shardings(sharded.model_cfg, sharded.mesh)})
    assert restored["dream"]["lm_head"]["embedding"].sharding.spec == head.sharding.spec
    restored = flatten(jax.device_get(restored))
    for key, want in flatten(load_run_params(cfg.train.workdir)).items():
        np.testing.assert_array_equal(restored[key], want, err_msg=key)
