"""GLM-4-Voice speech tokenizer: log-mel vs transformers, encoder + codes vs our PyTorch reference through the
converter, the reference pipeline end to end (30 s chunking included), 12.5 Hz on real audio, batch-vs-single,
mesh data parallelism, bad input, and the CLI."""

import json
import logging
import math

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
import transformers.models.whisper.feature_extraction_whisper as hf_whisper
from torch_ref import whisper_vq as ref

from omnidiff_jax import cli
from omnidiff_jax.audio_io import AudioError, load_audio
from omnidiff_jax.convert.keymap import ConversionError
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.convert.whisper_vq import load_checkpoint
from omnidiff_jax.models.whisper_vq import WhisperVQEncoder
from omnidiff_jax.sharding import make_mesh
from omnidiff_jax.speech_tokenizer import SpeechTokenizer, log_mel, mel_filters

WAVS = ("asr_0.wav", "s2i_0.wav", "svqa_0.wav")


@pytest.fixture(scope="module")
def clips(assets):
    """16 kHz clips: real speech (one resampled from 24 kHz), a short one ending 10 samples before a code
    boundary (reflect padding reaches real samples), and one over 30 s."""
    asr, _ = load_audio(assets / "asr_0.wav")
    s2i, _ = load_audio(assets / "s2i_0.wav")
    return {"asr": asr, "s2i": s2i, "short": asr[20000:20000 + 7 * 1280 - 10], "long": np.concatenate([asr, asr])}


@pytest.fixture(scope="module")
def fe():
    return ref.feature_extractor()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fe, clips):
    """A tiny random reference model with a codebook fitted to real speech, saved in the released layout."""
    config = ref.tiny_config()
    model = ref.random_whisper_vq(config)
    ref.fit_codebook(model, *ref.features(fe, [clips["asr"], clips["s2i"]]))
    folder = ref.save_checkpoint(model, tmp_path_factory.mktemp("glm4voice_tokenizer"), config)
    return model, folder, config


@pytest.fixture(scope="module")
def tokenizer(reference):
    return SpeechTokenizer.load(reference[1], batch_size=4)


@pytest.fixture(scope="module")
def batch_codes(tokenizer, clips):
    names = ("asr", "s2i", "short", "long")
    codes, lengths = tokenizer.tokenize([clips[n] for n in names])
    return {n: codes[i, :lengths[i]] for i, n in enumerate(names)}, codes, lengths


def test_mel_filters_match_transformers(fe):
    np.testing.assert_allclose(mel_filters(128), fe.mel_filters, rtol=1e-10, atol=1e-14)


def test_log_mel_matches_transformers(fe, clips, monkeypatch):
    waves = [clips["asr"], clips["s2i"], clips["short"]]
    mel, valid = log_mel(waves)
    assert mel.shape == (3, 1736, 128) and valid.shape == (3, 1736)
    for row, wave in enumerate(waves):
        torch_feats, torch_mask = ref.features(fe, [wave])  # the path the reference runs: float32 torch.stft
        with monkeypatch.context() as m:
            m.setattr(hf_whisper, "is_torch_available", lambda: False)  # transformers' float64 NumPy path
            exact_feats, _ = ref.features(fe, [wave])
        frames = torch_feats.shape[-1]
        assert frames == math.ceil(len(wave) / 1280) * 8
        ours = mel[row, :frames].T
        assert np.abs(ours - exact_feats[0].numpy()).max() <= 1e-5
        # torch's float32 STFT is itself ~1.4e-5 (asr_0) to ~1.9e-5 (s2i_0) off the exact values.
        assert np.abs(ours - torch_feats[0].numpy()).max() <= 5e-5
        np.testing.assert_array_equal(valid[row, :frames], torch_mask[0].numpy().astype(bool))
        assert not valid[row, frames:].any() and not mel[row, frames:].any()


def test_encoder_matches_reference_through_converter(reference, tokenizer, fe, clips):
    model = reference[0]
    feats, mask = ref.features(fe, [clips["asr"], clips["s2i"], clips["short"], clips["long"][-300000:]])
    with torch.no_grad():
        want_pooled, want_codes = model(feats, mask)
    pooled, codes = jax.jit(WhisperVQEncoder(tokenizer.config).apply)(
        {"params": tokenizer.params}, feats.numpy().transpose(0, 2, 1), mask.numpy().astype(bool))
    want_pooled = want_pooled.numpy()
    assert np.abs(np.asarray(pooled) - want_pooled).max() <= 1e-5 * np.abs(want_pooled).max()
    np.testing.assert_array_equal(np.asarray(codes), want_codes.numpy())
    assert len(np.unique(want_codes.numpy())) > 20  # the fitted codebook makes the comparison meaningful


def test_tokenize_matches_reference_pipeline(reference, fe, clips, batch_codes):
    got, _, lengths = batch_codes
    names = ("asr", "s2i", "short", "long")
    want = ref.extract_speech_token(reference[0], fe, [clips[n] for n in names])
    for name, w in zip(names, want):
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    # ceil(n / 1280) per 30 s segment: 277040 -> 217; 30 s -> 375, so the 34.6 s clip gives 375 + 58.
    assert list(lengths) == [217, math.ceil(len(clips["s2i"]) / 1280), 7, 433]


def test_long_clip_is_chunked_at_30s(tokenizer, clips, batch_codes):
    long = clips["long"]
    parts = [tokenizer.tokenize([long[:480000]]), tokenizer.tokenize([long[480000:]])]
    np.testing.assert_array_equal(batch_codes[0]["long"], np.concatenate([c[0, :n[0]] for c, n in parts]))


def test_batch_of_mixed_lengths_equals_each_alone(tokenizer, clips, batch_codes):
    got, codes, lengths = batch_codes
    for name in ("asr", "s2i", "short"):
        alone, n = tokenizer.tokenize([clips[name]])
        np.testing.assert_array_equal(alone[0, :n[0]], got[name], err_msg=name)
    assert codes.shape == (4, 433) and (codes[2, 7:] == -1).all() and (codes[2, :7] >= 0).all()


def test_code_rate_on_real_audio(tokenizer, assets):
    for name in WAVS:
        info = sf.info(str(assets / name))
        codes = tokenizer.tokenize_file(assets / name)
        seconds = info.frames / info.samplerate
        assert abs(len(codes) - 12.5 * seconds) <= 1, name
        assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() < tokenizer.config.codebook_size
    assert len(tokenizer.tokenize_file(assets / "svqa_0.wav")) == 13  # 1 s at 24 kHz -> 16000 samples -> 13


def test_other_sample_rates_are_resampled(tokenizer, assets, clips):
    raw, sr = load_audio(assets / "s2i_0.wav", target_sr=None)
    assert sr == 24000
    codes, n = tokenizer.tokenize([raw], sample_rate=24000)
    alone, m = tokenizer.tokenize([clips["s2i"]])
    np.testing.assert_array_equal(codes[0, :n[0]], alone[0, :m[0]])
    for bad in (0, -16000, 16000.0, True, None):
        with pytest.raises(AudioError, match="sample_rate"):
            tokenizer.tokenize([raw], sample_rate=bad)


def test_bad_audio_is_refused(tokenizer, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioError, match="garbage.wav"):
        tokenizer.tokenize_file(garbage)
    with pytest.raises(AudioError, match="missing.wav"):
        tokenizer.tokenize_file(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav.*no samples"):
        tokenizer.tokenize_file(empty)
    cases = [([np.zeros(0, np.float32)], r"waves\[0\].*no samples"),
             ([np.ones(100, np.float32), np.zeros((2, 100), np.float32)], r"waves\[1\].*shape \(2, 100\)"),
             ([np.array([0.0, np.nan], np.float32)], r"waves\[0\].*NaN"),
             (np.zeros(1600, np.float32), "sequence of clips")]
    for waves, message in cases:
        with pytest.raises(AudioError, match=message):
            tokenizer.tokenize(waves)


def test_full_model_layout_loads_the_same(reference, tokenizer, tmp_path, caplog):
    model, _, config = reference
    layer0 = {k[len("layers.0."):]: v for k, v in model.state_dict().items() if k.startswith("layers.0.")}
    extra = {f"model.encoder.layers.{i}.{k}": v.clone() for i in (2, 3) for k, v in layer0.items()}
    extra.update({"model.encoder.layer_norm.weight": torch.ones(64), "model.encoder.layer_norm.bias": torch.zeros(64),
                  "model.decoder.embed_tokens.weight": torch.zeros(10, 64), "proj_out.weight": torch.zeros(10, 64)})
    folder = ref.save_checkpoint(model, tmp_path, config, prefix="model.encoder.", extra=extra)
    with caplog.at_level(logging.INFO, logger="omnidiff_jax.convert"):
        _, params = load_checkpoint(folder / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, params, tokenizer.params)
    logged = caplog.text
    assert "dropping ema_weight" in logged and "dropping layer_norm.weight" in logged
    assert f"leaving out {2 * len(layer0)} tensors of encoder layers >= 2" in logged and "2 tensors outside the encoder" in logged


def test_converter_errors_name_the_problem(reference, tmp_path):
    model, _, config = reference
    state = {k: v for k, v in model.state_dict().items() if k != "codebook.weight"}
    state["conv2.weight"] = state["conv2.weight"][:, :, :2].contiguous()
    folder = tmp_path / "broken"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as err:
        load_checkpoint(folder)
    assert "codebook.weight" in str(err.value) and "shape mismatch for 'conv2.weight'" in str(err.value)
    (folder / "config.json").write_text(json.dumps({**config, "pooling_type": "max"}))
    with pytest.raises(CheckpointError, match="pooling_type='max'"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**config, "quantize_vocab_size": None}))
    with pytest.raises(CheckpointError, match="quantize_vocab_size"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(folder / "model.safetensors")


def test_data_parallel_on_a_mesh(reference, tokenizer, clips):
    waves = [clips["short"], clips["asr"][:50000], clips["asr"][100000:130000]]
    tok = SpeechTokenizer.load(reference[1], mesh=make_mesh(data=8), batch_size=4)
    assert tok.batch_size == 8 and tok.batch_rows(3) == 8  # rounded up to the mesh's 8 data-parallel ways
    codes, _ = tok.tokenize(waves)
    want, _ = tokenizer.tokenize(waves)
    np.testing.assert_array_equal(codes, want)


def test_batch_rows_do_not_pad_a_short_call(reference):
    tok = SpeechTokenizer.load(reference[1])  # default: at most 8 segments per device call
    assert tok.batch_size == 8
    assert [tok.batch_rows(n) for n in (1, 3, 8, 20)] == [1, 3, 8, 8]  # one clip under 30 s: batch 1, not 8


def test_cli(reference, tokenizer, assets, tmp_path, capsys):
    wav, out = assets / "svqa_0.wav", tmp_path / "codes.npy"
    want = tokenizer.tokenize_file(wav)
    args = ["audio", "tokenize", str(wav), "--tokenizer", str(reference[1])]
    assert cli.main(args + ["--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), want)
    assert cli.main(args + ["--out", str(out)]) == 2  # never overwrites unasked
    assert "exists" in capsys.readouterr().err
    assert cli.main(args) == 0
    assert capsys.readouterr().out.split() == [str(c) for c in want]
    assert cli.main(args + ["--batch-size", "1"]) == 0
    assert capsys.readouterr().out.split() == [str(c) for c in want]
    assert cli.main(args + ["--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert cli.main(["audio", "tokenize", str(tmp_path / "nope.wav"), "--tokenizer", str(reference[1])]) == 2
    assert "nope.wav" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]  # no temporary files left behind
