"""Speech input: Kaldi fbank / LFR / CMVN front end, SenseVoice encoder + projector parity through the converter,
placeholder expansion and scatter, the resampler, real audio end to end, bad input, and the CLI."""

import logging
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from omnidiff_jax import fbank
from omnidiff_jax.audio_io import AudioError, resample
from omnidiff_jax.cli import main
from omnidiff_jax.convert.keymap import ConversionError, flatten
from omnidiff_jax.convert.sensevoice import load_sensevoice_small, speech_keymap
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.models.projector import ProjectorConfig
from omnidiff_jax.models.sensevoice import SenseVoiceConfig, position_table
from omnidiff_jax.speech_in import (expand_audio_placeholders, load_sensevoice, load_speech_input, load_wave,
                                    scatter_audio)
from omnidiff_jax.vocab import TokenLayout
from torch_ref import dream as dream_ref
from torch_ref import sensevoice as ref
from torch_ref.omni import TINY_SPEECH

LENGTHS = (7, 3, 12)  # LFR frames of a mixed-length batch


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def write_am_mvn(path, shift, scale):
    """Kaldi nnet text, the way SenseVoiceSmall's am.mvn is laid out."""
    vec = lambda v: " ".join(f"{x:.7g}" for x in v)  # noqa: E731
    n = len(shift)
    path.write_text(f"<Nnet>\n<Splice> {n} {n}\n[ 0 ]\n<AddShift> {n} {n}\n<LearnRateCoef> 0 [ {vec(shift)} ]\n"
                    f"<Rescale> {n} {n}\n<LearnRateCoef> 0 [ {vec(scale)} ]\n</Nnet>\n")
    return path


def padded(feats):
    out = np.zeros((len(feats), max(len(f) for f in feats), feats[0].shape[1]), np.float32)
    for k, f in enumerate(feats):
        out[k, :len(f)] = f
    return out


# --------------------------------------------------------------------------------------------------- front end

@pytest.fixture(scope="module")
def asr_wave(assets):
    wave, sr = sf.read(assets / "asr_0.wav", dtype="float32")
    assert sr == 16000
    return wave


def check_fbank(ours, theirs):
    """float32 Kaldi pipelines agree to ~1e-6, except low-energy bins of loud frames, where both lose digits to
    cancellation in float32 (a few entries in 1e5 reach ~1e-3 relative)."""
    err = np.abs(ours - theirs) / np.abs(theirs)
    assert rel(ours, theirs) < 1e-5
    assert np.mean(err <= 1e-4) > 0.9999
    assert err.max() < 3e-3


def test_fbank_matches_kaldi_native_fbank(asr_wave):
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hamming"
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    opts.energy_floor = 0.0
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, (asr_wave * 32768).tolist())
    online.input_finished()
    theirs = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
    ours = fbank.fbank(asr_wave * 32768)
    assert ours.shape == (1 + (asr_wave.size - 400) // 160, 80) == theirs.shape
    check_fbank(ours, theirs)


def test_front_end_matches_torch_transcription(asr_wave, tmp_path):
    rng = np.random.default_rng(1)
    shift, scale = rng.normal(-12, 2, 560).astype(np.float32), rng.uniform(0.1, 0.2, 560).astype(np.float32)
    path = write_am_mvn(tmp_path / "am.mvn", shift, scale)
    cmvn = fbank.read_am_mvn(path)
    their_cmvn = ref.load_cmvn(path)
    np.testing.assert_array_equal(cmvn.shift, their_cmvn[0].numpy())
    np.testing.assert_array_equal(cmvn.scale, their_cmvn[1].numpy())

    wave = torch.from_numpy(asr_wave)
    check_fbank(fbank.fbank(asr_wave * 32768), ref.kaldi_fbank(wave * 32768).numpy())
    ours = fbank.features(asr_wave, cmvn)
    theirs = ref.frontend(wave, their_cmvn).numpy()
    assert ours.shape == theirs.shape == (math.ceil((1 + (asr_wave.size - 400) // 160) / 6), 560)
    assert rel(ours, theirs) < 1e-5
    np.testing.assert_allclose(ours, theirs, atol=5e-4)  # the fbank's float32 noise times scale <= 0.2


def test_lfr_and_cmvn_match_funasr_loops():
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((t, 80)).astype(np.float32) for t in (1, 5, 6, 7, 12, 13, 20)]
    for f in frames:
        np.testing.assert_array_equal(fbank.lfr(f[None])[0], ref.apply_lfr(torch.from_numpy(f)).numpy())
    # A padded batch: each row clamps to its own length, so it equals the clip alone.
    lengths = [len(f) for f in frames]
    batch = fbank.lfr(padded(frames), lengths)
    for k, f in enumerate(frames):
        np.testing.assert_array_equal(batch[k, :fbank.num_lfr_frames(len(f))], fbank.lfr(f[None])[0])

    cmvn = fbank.SENSEVOICE_CMVN  # these entries of SenseVoiceSmall's am.mvn
    assert (cmvn.shift[0], cmvn.shift[79], cmvn.scale[0], cmvn.scale[79]) == pytest.approx(
        (-8.311879, -11.71208, 0.155775, 0.1509654))
    np.testing.assert_array_equal(cmvn.shift.reshape(7, 80), np.broadcast_to(cmvn.shift[:80], (7, 80)))
    x = rng.standard_normal((9, 560)).astype(np.float32)
    table = torch.from_numpy(np.stack([cmvn.shift, cmvn.scale]))
    np.testing.assert_allclose(cmvn(x), ref.apply_cmvn(torch.from_numpy(x.copy()), table).numpy(), rtol=1e-6)


def test_wave_features_batch_and_dither(asr_wave):
    waves = [asr_wave[:16000], asr_wave[5000:12345], asr_wave[:400]]
    feats, lengths = fbank.wave_features(waves)
    assert lengths.tolist() == [fbank.num_lfr_frames(fbank.num_frames(w.size)) for w in waves] == [17, 8, 1]
    for k, w in enumerate(waves):
        np.testing.assert_allclose(feats[k, :lengths[k]], fbank.features(w), rtol=1e-5, atol=1e-6)
        assert not feats[k, lengths[k]:].any()
    a = fbank.features(waves[0], dither=1.0, rng=7)
    b = fbank.features(waves[0], dither=1.0, rng=7)
    c = fbank.features(waves[0], dither=1.0, rng=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4 and np.abs(a - feats[0]).max() > 1e-4


def test_am_mvn_errors(tmp_path):
    good = write_am_mvn(tmp_path / "good.mvn", np.zeros(560), np.ones(560)).read_text()
    cases = {
        "no_rescale.mvn": (good.split("<Rescale>")[0], "one <Rescale> component, found 0"),
        "short.mvn": (good.replace("<AddShift> 560", "<AddShift> 561"), "declares 561 values but holds 560"),
        "width.mvn": (write_am_mvn(tmp_path / "w", np.zeros(80), np.ones(80)).read_text(), "must be [560]"),
        "nan.mvn": (good.replace("[ 0 0", "[ nan 0", 1), "not finite"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(fbank.CmvnError, match=rf"{name}.*{message}|{message}.*{name}".replace("[", r"\[")):
            fbank.read_am_mvn(tmp_path / name)
    (tmp_path / "binary.mvn").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(fbank.CmvnError, match="binary.mvn"):
        fbank.read_am_mvn(tmp_path / "binary.mvn")


# --------------------------------------------------------------------------------------------------- resampling

def test_resampler_matches_reference_and_soxr_is_close(assets):
    import soxr
    wave, sr = sf.read(assets / "s2i_0.wav", dtype="float32")
    assert sr == 24000
    theirs = ref.sinc_resample(torch.from_numpy(wave), sr, 16000).numpy()
    ours = resample(wave, sr, 16000)
    assert ours.shape == theirs.shape == (math.ceil(wave.size * 2 / 3),)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # soxr VHQ is another band-limited resampler: ~51 dB SNR against the reference on this clip; the
    # difference sits above ~7 kHz, where the two filters' band edges differ.
    snr = 10 * np.log10((theirs ** 2).sum() / ((soxr.resample(wave, sr, 16000, quality="VHQ") - theirs) ** 2).sum())
    assert snr > 45


# --------------------------------------------------------------------------------------------------- encoder

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny torch SenseVoiceSmall + projector saved as Omni-Diffusion safetensors (with an LLM key beside them),
    a standalone model.pt + am.mvn folder, and the loaded fp32 SpeechInput."""
    folder = tmp_path_factory.mktemp("speech")
    sv, proj = ref.random_speech(ref.tiny_config(), hidden_size=64)
    state = ref.omni_state(sv, proj)
    save_file({**state, "model.norm.weight": torch.ones(64)}, folder / "model.safetensors")
    standalone = folder / "SenseVoiceSmall"
    standalone.mkdir()
    torch.save(sv.state_dict(), standalone / "model.pt")
    write_am_mvn(standalone / "am.mvn", fbank.SENSEVOICE_CMVN.shift, fbank.SENSEVOICE_CMVN.scale)
    speech = load_speech_input(folder / "model.safetensors", SenseVoiceConfig.tiny(), ProjectorConfig.tiny())
    rng = np.random.default_rng(0)
    # bf16-representable: the reference's AudioEncoder rounds its input to bf16, our float32 mode takes it as is
    feats = [rng.standard_normal((n, 560)).astype(ml_dtypes.bfloat16).astype(np.float32) for n in LENGTHS]
    return dict(sv=sv, proj=proj, state=state, folder=folder, standalone=standalone, speech=speech, feats=feats)


def test_encoder_projector_fp32_parity_and_batch_equals_singles(reference):
    r = reference
    with torch.no_grad():
        out, lens = ref.audio_encoder(r["sv"], [torch.from_numpy(f) for f in r["feats"]])
        theirs = r["proj"](out).numpy()
    ours, our_lens = r["speech"].embed(padded(r["feats"]), LENGTHS)
    assert our_lens.tolist() == lens.tolist() == [n + 4 for n in LENGTHS]
    assert ours.shape == (3, max(LENGTHS) + 4, 64) and ours.dtype == jnp.float32
    for k, n in enumerate(LENGTHS):
        np.testing.assert_allclose(ours[k, :n + 4], theirs[k, :n + 4], rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
        alone, _ = r["speech"].embed(r["feats"][k][None], [n])
        np.testing.assert_allclose(ours[k, :n + 4], alone[0], rtol=1e-5, atol=1e-5)  # float32 rounding only


def test_bf16_matches_reference_within_bf16_noise(reference):
    r = reference
    feats = [np.random.default_rng(1).standard_normal((n, 560)).astype(np.float32) for n in (290, 100)]
    speech = load_speech_input(r["folder"] / "model.safetensors", SenseVoiceConfig.tiny(),
                               ProjectorConfig.tiny(), dtype="bfloat16")
    assert speech.encoder.bf16_positions  # the reference's table, as bf16 implies
    ours, _ = speech.embed(padded(feats), [290, 100])
    assert ours.dtype == jnp.bfloat16
    with torch.no_grad():
        fp32 = r["proj"](ref.audio_encoder(r["sv"], [torch.from_numpy(f) for f in feats])[0]).numpy()
        sv16 = ref.SenseVoiceSmall(ref.tiny_config()).to(torch.bfloat16)
        sv16.load_state_dict(r["sv"].state_dict())
        proj16 = ref.ResamplerProjector(32, 64).to(torch.bfloat16)
        proj16.load_state_dict(r["proj"].state_dict())
        bf16 = proj16(ref.audio_encoder(sv16, [torch.from_numpy(f) for f in feats])[0]).float().numpy()
    ours = np.asarray(ours, np.float32)
    for k, n in enumerate((290, 100)):
        noise = rel(bf16[k, :n + 4], fp32[k, :n + 4])  # what bf16 itself costs the reference (~1-2%)
        assert 1e-3 < noise < 5e-2
        assert rel(ours[k, :n + 4], bf16[k, :n + 4]) < 1.5 * noise
        assert rel(ours[k, :n + 4], fp32[k, :n + 4]) < 1.5 * noise


def test_position_tables_match_reference():
    bf16 = position_table(600, 560, bf16=True)
    theirs = ref.sinusoidal_encode(600, 560, torch.bfloat16)[0].float().numpy()
    np.testing.assert_array_equal(bf16, theirs)  # bit for bit, positions > 256 included
    assert (bf16.astype(ml_dtypes.bfloat16).astype(np.float32) == bf16).all()
    exact = position_table(600, 560, bf16=False)
    np.testing.assert_allclose(exact, ref.sinusoidal_encode(600, 560, torch.float32)[0].numpy(), atol=2e-4)
    angle = np.arange(1, 601)[:, None] * np.exp(-np.arange(280) * np.log(10000) / 279)[None]
    np.testing.assert_allclose(exact, np.concatenate([np.sin(angle), np.cos(angle)], 1), atol=2e-4)
    assert np.abs(bf16 - exact).max() > 0.5  # the reference's table really is that lossy at large positions


def test_standalone_sensevoice_and_export_round_trip(reference, caplog):
    r = reference
    with caplog.at_level(logging.INFO, logger="omnidiff_jax.convert.keymap"):
        params, cmvn = load_sensevoice_small(r["standalone"], SenseVoiceConfig.tiny())
    assert "ctc.ctc_lo.weight" in caplog.text and "CTC head" in caplog.text
    np.testing.assert_array_equal(cmvn.shift, fbank.SENSEVOICE_CMVN.shift)
    omni = flatten(r["speech"].params["encoder"])
    assert flatten(params).keys() == omni.keys()
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(value, omni[key])

    exported = dict(speech_keymap().export(r["speech"].params))
    expected = {k: v for k, v in r["state"].items() if ".ctc." not in k}
    assert exported.keys() == expected.keys()
    for key, value in exported.items():
        np.testing.assert_array_equal(value, expected[key].numpy(), err_msg=key)


def test_sensevoice_alone_from_a_safetensors_state_dict_in_float32(reference, tmp_path):
    """SenseVoice without a projector, from a folder holding a safetensors state dict + am.mvn, float32 end to
    end: unrounded features and the exact position table give the float32 reference's encoder output."""
    r = reference
    folder = tmp_path / "sensevoice"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in r["sv"].state_dict().items()}, folder / "model.safetensors")
    write_am_mvn(folder / "am.mvn", fbank.SENSEVOICE_CMVN.shift, fbank.SENSEVOICE_CMVN.scale)
    speech = load_sensevoice(folder, SenseVoiceConfig.tiny(), dtype="float32")
    assert speech.projector is None and set(speech.params) == {"encoder"}
    assert not speech.encoder.bf16_positions and SenseVoiceConfig.tiny(dtype="bfloat16").bf16_positions
    feats = [np.random.default_rng(3).standard_normal((n, 560)).astype(np.float32) for n in (9, 5)]
    ours, lengths = speech.embed(padded(feats), [9, 5])
    assert ours.shape == (2, 13, 32) and ours.dtype == jnp.float32 and lengths.tolist() == [13, 9]
    with torch.no_grad():  # inference_encode on float32 features: AudioEncoder's bf16 rounding skipped
        theirs, _ = r["sv"].inference_encode(torch.from_numpy(padded(feats)), torch.tensor([9, 5]))
    for k, n in enumerate((9, 5)):
        np.testing.assert_allclose(ours[k, :n + 4], theirs[k, :n + 4].numpy(), rtol=1e-5, atol=1e-5)
    rounded = speech.embed(padded(feats).astype(ml_dtypes.bfloat16).astype(np.float32), [9, 5])[0]
    assert rel(rounded[0, :13], theirs[0, :13].numpy()) > 1e-4  # so the features really were not rounded
    without = load_speech_input(r["folder"] / "model.safetensors", SenseVoiceConfig.tiny(), None)
    assert without.projector is None and set(without.params) == {"encoder"}
    np.testing.assert_array_equal(without.embed(padded(feats), [9, 5])[0], ours)


def test_converter_reports_bad_checkpoints(reference, tmp_path):
    state = dict(reference["state"])
    del state["model.audio_model.model.encoder.tp_norm.bias"]
    state["model.audio_projection.mlp.0.weight"] = torch.zeros(64, 31)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        load_speech_input(tmp_path / "bad.safetensors", SenseVoiceConfig.tiny(), ProjectorConfig.tiny())
    assert "encoder.tp_norm.bias" in str(e.value) and "mlp.0.weight" in str(e.value) and "(64, 31)" in str(e.value)
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "llm_only.safetensors")
    with pytest.raises(CheckpointError, match="no SenseVoice encoder keys"):
        load_speech_input(tmp_path / "llm_only.safetensors", SenseVoiceConfig.tiny(), ProjectorConfig.tiny())
    (tmp_path / "empty").mkdir()
    torch.save(reference["sv"].state_dict(), tmp_path / "empty" / "model.pt")
    with pytest.raises(CheckpointError, match="am.mvn"):
        load_sensevoice_small(tmp_path / "empty", SenseVoiceConfig.tiny())
    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.pt"):
        load_sensevoice_small(tmp_path / "none", SenseVoiceConfig.tiny())


# --------------------------------------------------------------------------------------------------- placeholders

def test_expand_audio_placeholders():
    lay = TokenLayout()
    boa, eoa, ctx, tag = 151684, 151685, 151686, 151687  # added in this order by Omni-Diffusion `tokenizer.py`
    assert (lay.begin_of_audio, lay.end_of_audio, lay.context_of_audio, lay.audio_tag) == (boa, eoa, ctx, tag)
    ids, positions = expand_audio_placeholders([10, tag, 11, 12, tag, 13], [2, 1], lay)
    assert ids.tolist() == [10, boa] + [ctx] * 6 + [eoa, 11, 12, boa] + [ctx] * 5 + [eoa, 13]
    assert positions.tolist() == [[2, 3, 4, 5, 6, 7], [12, 13, 14, 15, 16, -1]]
    assert (ids[positions[positions >= 0]] == ctx).all() and (ids == ctx).sum() == 11
    # 10 s at 16 kHz: T = 998, T_lfr = 167 -> 171 context slots, 173 tokens in place of the tag.
    t_lfr = fbank.num_lfr_frames(fbank.num_frames(160000))
    assert t_lfr == 167 and len(expand_audio_placeholders([tag], [t_lfr], lay)[0]) == 173
    no_audio, none = expand_audio_placeholders([1, 2], [], lay)
    assert no_audio.tolist() == [1, 2] and none.shape == (0, 0)
    with pytest.raises(ValueError, match="holds 2 <|audio|>.*1 frame count"):
        expand_audio_placeholders([tag, tag], [3], lay)
    with pytest.raises(ValueError, match="1-D"):
        expand_audio_placeholders([[tag]], [3], lay)
    with pytest.raises(ValueError, match="positive"):
        expand_audio_placeholders([tag], [0], lay)


def test_scatter_audio_overwrites_only_placeholders():
    embeds = jnp.arange(2 * 9 * 3, dtype=jnp.float32).reshape(2, 9, 3)
    features = -jnp.arange(1, 2 * 5 * 3 + 1, dtype=jnp.float32).reshape(2, 5, 3)  # S' = 5 >= S = 4
    positions = np.array([[2, 3, 4, -1], [0, 1, 7, 8]], np.int32)
    out = jax.jit(scatter_audio)(embeds.astype(jnp.bfloat16), features, positions, np.array([1, 0]))
    assert out.dtype == jnp.bfloat16
    expected = np.array(embeds)
    expected[1, [2, 3, 4]] = features[0, :3]
    expected[0, [0, 1, 7, 8]] = features[1, :4]
    np.testing.assert_array_equal(np.asarray(out, np.float32), expected)
    with pytest.raises(ValueError, match="features must be"):
        scatter_audio(embeds, features[:, :3], positions)
    with pytest.raises(ValueError, match="embeds must be"):
        scatter_audio(embeds[0], features, positions)


# --------------------------------------------------------------------------------------------------- real audio

def test_real_audio_end_to_end(reference, assets):
    speech = reference["speech"]
    paths = [assets / "asr_0.wav", assets / "s2i_0.wav"]  # 16 kHz float; 24 kHz PCM
    feats, lengths = speech.features(paths)
    n16 = [277040, math.ceil(296640 * 2 / 3)]
    assert lengths.tolist() == [fbank.num_lfr_frames(1 + (n - 400) // 160) for n in n16] == [289, 206]
    embeds, out_lengths = speech(paths)
    assert out_lengths.tolist() == [293, 210] and embeds.shape == (2, 293, 64)
    assert np.isfinite(np.asarray(embeds)).all()
    np.testing.assert_array_equal(embeds, speech(paths)[0])  # deterministic

    lay = TokenLayout()
    ids, positions = expand_audio_placeholders([5, lay.audio_tag, 6], lengths[1:], lay)
    filled = scatter_audio(jnp.zeros((1, len(ids), 64)), embeds[1:], positions)[0]
    np.testing.assert_array_equal(filled[2:212], embeds[1, :210])
    assert not np.asarray(filled[np.array([0, 1, 212, 213])]).any()


def test_bad_audio_is_rejected(tmp_path, reference):
    speech = reference["speech"]
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "short.wav", np.zeros(399, np.float32), 16000)
    sf.write(tmp_path / "short24k.wav", np.zeros(500, np.float32), 24000)  # 334 samples at 16 kHz
    nan = np.zeros(1000, np.float32)
    nan[123] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    for name, message in [("text.wav", "cannot be read"), ("empty.wav", "no samples"),
                          ("short.wav", "shorter than one 25 ms frame"), ("short24k.wav", "334 samples"),
                          ("nan.wav", "NaN.*index 123"), ("missing.wav", "cannot be read")]:
        with pytest.raises(AudioError, match=message) as e:
            speech([tmp_path / name])
        assert name in str(e.value)
    with pytest.raises(AudioError, match=r"expected mono.*\(2, 1000\)"):
        fbank.features(np.zeros((2, 1000), np.float32))
    with pytest.raises(AudioError, match="no waveforms"):
        fbank.wave_features([])
    with pytest.raises(ValueError, match="features must be"):
        speech.embed(np.zeros((1, 5, 80)), [5])
    with pytest.raises(ValueError, match="lengths"):
        speech.embed(np.zeros((2, 5, 560)), [5, 6])


def test_cli_features(assets, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    assert main(["audio", "features", str(assets / "s2i_0.wav"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "206 x 560" in printed and "mean" in printed
    np.testing.assert_array_equal(np.load(out), fbank.features(load_wave(assets / "s2i_0.wav")))
    assert main(["audio", "features", str(assets / "s2i_0.wav"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["audio", "features", str(tmp_path / "nope.wav")]) == 2
    assert "nope.wav" in capsys.readouterr().err


SENSEVOICE_YAML = """encoder: SenseVoiceEncoderSmall
encoder_conf:
    output_size: 32
    attention_heads: 2
    linear_units: 64
    num_blocks: 3
    tp_blocks: 2
    dropout_rate: 0.1
    kernel_size: 11
    sanm_shfit: 0
frontend: WavFrontend
frontend_conf:
    fs: 16000
    n_mels: 80
    lfr_m: 7
    lfr_n: 6
    cmvn_file: am.mvn
"""


def test_cli_encode(reference, assets, tmp_path, capsys):
    """`omnidiff audio encode`: a released-style SenseVoiceSmall folder (its shape from config.yaml), or an
    Omni-Diffusion folder with the projector, against the torch reference on our (separately tested) features."""
    r, wav = reference, assets / "s2i_0.wav"
    folder = tmp_path / "SenseVoiceSmall"
    folder.mkdir()
    for name in ("model.pt", "am.mvn"):
        (folder / name).write_bytes((r["standalone"] / name).read_bytes())
    (folder / "config.yaml").write_text(SENSEVOICE_YAML)
    feats = fbank.features(load_wave(wav))
    with torch.no_grad():
        theirs = r["sv"].inference_encode(torch.from_numpy(feats)[None], torch.tensor([len(feats)]))[0][0].numpy()

    out32, out16 = tmp_path / "enc32.npy", tmp_path / "enc16.npy"
    args = ["audio", "encode", str(wav), "--sensevoice", str(folder)]
    assert main(args + ["--out", str(out32), "--dtype", "float32"]) == 0
    assert "210 x 32 float32 (float32 compute)" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out32), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert main(args + ["--out", str(out16)]) == 0  # bfloat16, the reference's numerics, by default
    assert 1e-3 < rel(np.load(out16), theirs) < 5e-2
    assert main(args + ["--out", str(out16)]) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "x.npy"), "--projector"]) == 2
    assert "--projector needs --checkpoint" in capsys.readouterr().err

    c = dream_ref.tiny_hf_config(omnidiff_speech=TINY_SPEECH)
    hf = dream_ref.save_hf(dream_ref.random_dream(c), tmp_path / "hf", c, extra=ref.omni_state(r["sv"], r["proj"]))
    projected = tmp_path / "projected.npy"
    assert main(["audio", "encode", str(wav), "--checkpoint", str(hf), "--projector", "--dtype", "float32",
                 "--out", str(projected)]) == 0
    with torch.no_grad():
        want = r["proj"](torch.from_numpy(theirs)).numpy()
    np.testing.assert_allclose(np.load(projected), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
