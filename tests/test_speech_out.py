"""GLM-4-Voice speech output: flow decoder and HiFT vocoder against our PyTorch reference (random weights saved as
real flow.pt/hift.pt files and read through the converter, float32), the frame-count rule, the converter's key
handling, determinism, bad input and the `omnidiff audio decode` command."""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from omnidiff_jax.cli import main
from omnidiff_jax.convert.glm4voice_decoder import flow_keymap, hift_keymap, read_decoder_config
from omnidiff_jax.convert.keymap import ConversionError
from omnidiff_jax.convert.sources import CheckpointError, in_memory
from omnidiff_jax.models.flow import Flow, FlowConfig, mel_frames
from omnidiff_jax.models.hift import HiFT, HiFTConfig
from omnidiff_jax.speech_out import CodesError, SpeechDecoder, decode_speech, flow_param_shapes, hift_param_shapes
from torch_ref import glm4voice_decoder as R

KEYS = Path(__file__).resolve().parent / "data" / "keys"
MEL = R.TINY_FLOW["output_size"]


def apply(module, variables, method, *args):
    """One jitted call of a module method (far cheaper than running its many small ops eagerly)."""
    return jax.jit(lambda v, *a: module.apply(v, *a, method=method))(variables, *args)


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nwc(t):
    """torch [B, C, T] -> numpy [B, T, C]."""
    return t.detach().numpy().transpose(0, 2, 1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Reference flow and HiFT with random weights, saved as a decoder folder (released key style)."""
    flow, hift = R.random_flow(), R.random_hift()
    folder = R.save_decoder(tmp_path_factory.mktemp("glm4voice") / "decoder", flow, hift)
    return flow, hift, folder


@pytest.fixture(scope="module")
def decoder(ref):
    return SpeechDecoder.load(ref[2])


@pytest.fixture(scope="module")
def codes():
    """Two utterances in one length bucket (24 codes): 23 and 17 codes, both longer than an encoder block."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 16384, (n,), generator=g) for n in (23, 17)]


@pytest.fixture(scope="module")
def flow_outputs(ref, decoder, codes):
    """Reference mels (torch.manual_seed(42) noise, batch 1 each) and ours for the padded batch of both."""
    flow = ref[0]
    mels, noise = [], []
    for c in codes:
        mels.append(flow.inference(c[None])[0])
        torch.manual_seed(42)  # the reference's z: randn_like(mu) right after manual_seed(42)
        noise.append(torch.randn(1, MEL, mels[-1].shape[-1])[0].numpy())  # [80, frames], as the reference's
    ours, frames = decoder.mel([c.numpy() for c in codes], noise=noise)
    return mels, np.asarray(ours), frames


# ------------------------------------------------------------------------------------------------ frame count, config

def test_mel_frames_is_the_reference_float32_rule():
    n = np.arange(1, 5001)
    torch_frames = (torch.from_numpy(n.astype(np.int32)) / 12.5 * 22050 / 256).int().numpy()
    np.testing.assert_array_equal(mel_frames(n), torch_frames)
    below_exact = n[mel_frames(n) != n * 441 // 64]
    np.testing.assert_array_equal(below_exact, [3392, 3776, 4160])  # flow.py: float32 lands one frame short
    assert mel_frames(3392) == 3392 * 441 // 64 - 1
    assert [int(mel_frames(k)) for k in (10, 37, 50, 123)] == [68, 254, 344, 847]


def released_keys(name):
    """{key: shape} from data/keys/glm4voice_{name}.txt (lines `key (d0, d1) float32`)."""
    lines = (KEYS / f"glm4voice_{name}.txt").read_text().splitlines()
    rows = [re.fullmatch(r"(\S+) \(([\d, ]*)\) float32", ln) for ln in lines if ln.strip() and ln[0] != "#"]
    return {m[1]: tuple(int(x) for x in re.findall(r"\d+", m[2])) for m in rows}


def test_released_config_and_key_lists(tmp_path):
    """The released config.yaml parses to our defaults, and our key maps accept exactly the released key lists."""
    (tmp_path / "config.yaml").write_text(R.config_yaml(R.FLOW, R.HIFT))
    flow_cfg, hift_cfg = read_decoder_config(tmp_path / "config.yaml")
    assert flow_cfg == FlowConfig() and hift_cfg == HiFTConfig()
    for name, keymap, shapes, count, params in (
            ("flow", flow_keymap(flow_cfg), flow_param_shapes(flow_cfg), 1185, 111_166_208),
            ("hift", hift_keymap(hift_cfg), hift_param_shapes(hift_cfg), 227, 20_447_517)):  # hift: g folded
        released = released_keys(name)
        plan = keymap.plan(released, {k: v.shape for k, v in shapes.items()}, name)
        assert not plan.dropped and len(released) == count
        assert sum(math.prod(v.shape) for v in shapes.values()) == params


def test_config_rejects_what_is_not_ported(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(R.config_yaml().replace("'block_rel_selfattn'", "'rel_selfattn'"))
    with pytest.raises(CheckpointError, match=r"flow\.encoder\.selfattention_layer_type.*'rel_selfattn'"):
        read_decoder_config(path)
    path.write_text(R.config_yaml().replace("        n_fft: 16\n", ""))
    with pytest.raises(CheckpointError, match=r"hift\.istft_params\.n_fft` is missing"):
        read_decoder_config(path)
    path.write_text(R.config_yaml().replace("upsample_rates: [8, 8]", "upsample_rates: [8, 4]"))
    with pytest.raises(CheckpointError, match="upsamples 128x"):
        read_decoder_config(path)


# ------------------------------------------------------------------------------------------------ converter

def test_weight_norm_folding_and_both_key_styles(ref, decoder):
    hift = ref[1]
    new_style = R.state_dict(hift, weight_norm_keys="parametrizations")
    assert "ups.0.parametrizations.weight.original0" in new_style
    params = hift_keymap(decoder.hift_config).load(in_memory({k: v.numpy() for k, v in new_style.items()}),
                                                   hift_param_shapes(decoder.hift_config))
    for path in ("ups_0", "conv_pre", "resblocks_1/convs1_1", "f0_predictor/condnet_4"):
        node_a, node_b = params, decoder.hift_params
        for p in path.split("/"):
            node_a, node_b = node_a[p], node_b[p]
        np.testing.assert_array_equal(node_a["kernel"], node_b["kernel"])
    # ConvTranspose1d: g is per *input* channel; torch's effective weight [I, O, k] -> Flax [k, O, I].
    torch_w = hift.ups[0].weight.detach().numpy()
    assert hift.ups[0].parametrizations.weight.original0.shape == (torch_w.shape[0], 1, 1)
    np.testing.assert_allclose(params["ups_0"]["kernel"], torch_w.transpose(2, 1, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(params["conv_pre"]["kernel"], hift.conv_pre.weight.detach().numpy().transpose(2, 1, 0),
                               rtol=1e-6, atol=1e-7)


def test_converter_reports_every_bad_key(ref, decoder):
    flow_sd = {k: v.numpy() for k, v in R.state_dict(ref[0]).items()}
    del flow_sd["encoder.encoders.1.self_attn.pos_bias_u"]
    flow_sd["decoder.estimator.stray.weight"] = np.zeros(3, np.float32)
    flow_sd["encoder_proj.weight"] = np.zeros((MEL, 7), np.float32)
    with pytest.raises(ConversionError) as e:
        flow_keymap(decoder.flow_config).load(in_memory(flow_sd, "flow.pt"), flow_param_shapes(decoder.flow_config))
    msg = str(e.value)
    assert "encoder.encoders.1.self_attn.pos_bias_u" in msg and "decoder.estimator.stray.weight" in msg
    assert "encoder_proj.weight" in msg and "flow.pt" in msg
    hift_sd = {k: v.numpy() for k, v in R.state_dict(ref[1]).items()}
    hift_sd["conv_post.weight_g"] = hift_sd["conv_post.weight_g"][:1]
    with pytest.raises(ConversionError, match="conv_post.weight_v"):
        hift_keymap(decoder.hift_config).load(in_memory(hift_sd), hift_param_shapes(decoder.hift_config))


# ------------------------------------------------------------------------------------------------ flow parity

def test_encoder_and_length_regulator(ref, decoder, codes):
    flow, module, variables = ref[0], Flow(decoder.flow_config), {"params": decoder.flow_params}
    c = codes[0][None]
    with torch.no_grad():
        h_ref = flow.encode(c)
        mu_ref = flow.length_regulator(h_ref, int(mel_frames(c.shape[1])))
    h = apply(module, variables, Flow.encode, jnp.asarray(c.numpy(), jnp.int32), jnp.ones(c.shape, bool))
    assert rel(h, h_ref.numpy()) < 1e-5
    mu = apply(module, variables, Flow.regulate, jnp.asarray(h_ref.numpy()), jnp.array([c.shape[1]]),
               jnp.ones((1, mu_ref.shape[1]), bool))
    assert rel(mu, mu_ref.numpy()) < 1e-5


def test_estimator(ref, decoder):
    g = torch.Generator().manual_seed(3)
    x, mu, cond = (torch.randn(1, MEL, 37, generator=g) for _ in range(3))  # odd length: both U-Net crops
    spk = torch.randn(1, MEL, generator=g)
    with torch.no_grad():
        v_ref = ref[0].decoder.estimator(x, torch.ones(1, 1, 37), mu, torch.tensor(0.3), spk, cond)
    v = apply(Flow(decoder.flow_config), {"params": decoder.flow_params}, Flow.estimate, nwc(x),
              jnp.ones((1, 37), bool), nwc(mu), jnp.array([0.3]), spk.numpy(), nwc(cond))
    assert rel(v, nwc(v_ref)) < 1e-5


def test_flow_with_reference_noise_batched_and_padded(flow_outputs):
    mels, ours, frames = flow_outputs
    assert ours.shape == (2, int(mel_frames(24)), MEL)  # both padded to the 24-code bucket
    assert list(frames) == [m.shape[-1] for m in mels] == [158, 117]
    for b, m in enumerate(mels):
        assert rel(ours[b, :frames[b]], m.numpy().T) < 1e-4
        assert not ours[b, frames[b]:].any()


# ------------------------------------------------------------------------------------------------ HiFT parity

def test_f0_predictor_and_sine_source(ref, decoder):
    hift, module, variables = ref[1], HiFT(decoder.hift_config), {"params": decoder.hift_params}
    g = torch.Generator().manual_seed(4)
    mel = torch.randn(1, MEL, 12, generator=g)
    with torch.no_grad():
        f0_ref = hift.f0_predictor(mel)
    assert rel(apply(module, variables, HiFT.f0, nwc(mel), jnp.array([12])), f0_ref.numpy()) < 1e-5
    # A voiced/unvoiced f0 track (the random predictor's output need not be voiced), and the reference's draws.
    f0 = torch.tensor([[0.0, 120.0, 133.5, 180.0, 240.0, 5.0, 0.0, 310.0, 95.0, 101.0, 0.0, 260.0]])
    torch.manual_seed(5)
    with torch.no_grad():
        s_ref = hift.m_source(F.interpolate(f0[:, None], scale_factor=256, mode="nearest"))
    torch.manual_seed(5)  # replay: the initial phases, then the noise, as SineGen draws them
    phases = torch.distributions.Uniform(-np.pi, np.pi).sample((1, 9, 1))[:, :, 0]
    noise = torch.randn(1, 9, 12 * 256).reshape(1, 9, 12, 256).permute(0, 2, 3, 1)
    s = apply(module, variables, HiFT.source, f0.numpy(), phases.numpy(), noise.numpy())
    assert rel(s, s_ref[:, 0].numpy()) < 1e-4


def test_hift_with_reference_source_batched_and_padded(ref, decoder, flow_outputs):
    mels, ours_mel, frames = flow_outputs
    hift = ref[1]
    torch.manual_seed(11)
    refs = [hift(m[None]) for m in mels]  # (wave, source) per utterance, batch 1
    padded_mel = np.zeros_like(ours_mel)
    for b, m in enumerate(mels):
        padded_mel[b, :frames[b]] = m.numpy().T
    waves = decoder.vocode(jnp.asarray(padded_mel), frames, source=[s[0, 0].numpy() for _, s in refs])
    for b, (wave_ref, _) in enumerate(refs):
        assert np.abs(wave_ref.numpy()).max() < 0.99  # unclipped, so the comparison sees every sample
        assert rel(waves[b, :256 * frames[b]], wave_ref[0].numpy()) < 1e-4


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def reference_draws(ref, codes):
    """The reference's decode of codes[1] (batch 1) with its own draws, replayed in its layout: (mel [80, T],
    waveform, z [80, T], phases [9], sine noise [9, 256 T])."""
    flow, hift, _ = ref
    mel_ref = flow.inference(codes[1][None])  # seeds torch with 42 and draws z = randn_like(mu) [1, 80, T]
    frames = mel_ref.shape[-1]
    torch.manual_seed(42)
    z = torch.randn(1, MEL, frames)[0].numpy()
    torch.manual_seed(3)
    wave_ref, _ = hift(mel_ref)
    torch.manual_seed(3)  # replay SineGen: the initial phases, then the noise
    phases = torch.distributions.Uniform(-np.pi, np.pi).sample((1, 9, 1))[0, :, 0].numpy()
    sine_noise = torch.randn(1, 9, 256 * frames)[0].numpy()
    assert np.abs(wave_ref.numpy()).max() < 0.99  # unclipped, so the comparisons see every sample
    return mel_ref[0].numpy(), wave_ref[0].numpy(), z, phases, sine_noise


def test_reference_noise_reproduces_the_reference(decoder, codes, reference_draws):
    """The reference's own draws, injected in its layout (CFM's z [80, T]; SineGen's phases [9] and noise
    [9, 256 T]), give the reference's waveform."""
    _, wave_ref, z, phases, noise = reference_draws
    c, frames = codes[1], z.shape[1]
    mel, lengths = decoder.mel([c.numpy()], noise=[z])
    wave = decoder.vocode(mel, lengths, phases=[phases], noise=[noise])
    assert lengths[0] == frames
    assert rel(wave[0, :256 * frames], wave_ref) < 1e-3
    with pytest.raises(ValueError, match="phases and noise shapes"):
        decoder.vocode(mel, lengths, phases=[phases], noise=[noise[:, :-1]])
    with pytest.raises(ValueError, match="exactly one of keys, phases with noise, or source"):
        decoder.vocode(mel, lengths, phases=[phases])


def test_decode_speech_is_seeded_and_independent_of_batch_mates(decoder, codes):
    a, c = (x.numpy() for x in codes)
    other = np.random.RandomState(0).randint(0, 16384, 20)  # same bucket, different length and content
    first = decode_speech([a, c], decoder, seed=7)
    again = decode_speech([a, c], decoder, seed=7)
    mates = decode_speech([a, other], decoder, seed=7)
    reseeded = decode_speech([a, c], decoder, seed=8)
    assert [len(w) for w in first] == [256 * 158, 256 * 117] and len(mates[1]) == 256 * int(mel_frames(20))
    assert all(w.dtype == np.float32 and np.abs(w).max() <= 0.99 for w in first)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_allclose(mates[0], first[0], atol=1e-5)
    assert np.abs(reseeded[0] - first[0]).max() > 0.01


@pytest.mark.parametrize("bad, match", [
    ([[]], "utterance 0: the code list is empty"),
    ([[3, 5], [1, 16384]], r"utterance 1: code 16384 at position 1 is outside \[0, 16384\)"),
    ([[-1]], "code -1 at position 0"),
    ([[1.5, 2.0]], "must be integers"),
    ([], "non-empty batch"),
    ([4, 5], "1-D sequence"),
])
def test_bad_codes(decoder, bad, match):
    with pytest.raises(CodesError, match=match):
        decode_speech(bad, decoder)


def test_cli_decode(ref, decoder, codes, tmp_path, capsys):
    folder, c = str(ref[2]), codes[0].numpy()
    src = tmp_path / "codes.txt"
    src.write_text("<|begin_of_audio|>" + "".join(f"<|audio_{k}|>" for k in c) + "<|end_of_audio|>")
    out = tmp_path / "out.wav"
    assert main(["audio", "decode", str(src), str(out), "--decoder", folder, "--seed", "3"]) == 0
    wave, sr = sf.read(out, dtype="float32")
    expected = decode_speech([c], decoder, seed=3)[0]
    assert sr == 22050 and len(wave) == 256 * 158
    assert np.abs(wave - expected).max() <= 1.01 / 32768  # 16-bit PCM rounding
    before = sorted(p.name for p in tmp_path.iterdir())
    src.write_text(", ".join(map(str, c)))  # plain integer list, same codes
    assert main(["audio", "decode", str(src), str(out), "--decoder", folder]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    for text, message in (("", "holds no speech codes"), ("12 x 7", "'x' is not an integer"),
                          ("12 16384", "code 16384 at position 1")):
        src.write_text(text)
        assert main(["audio", "decode", str(src), str(tmp_path / "bad.wav"), "--decoder", folder]) == 2
        assert message in capsys.readouterr().err
    src.write_text("12 13")
    unwritable = tmp_path / "codes.txt" / "out.wav"  # its folder is a file
    assert main(["audio", "decode", str(src), str(unwritable), "--decoder", folder]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial or temporary files


def test_cli_decode_mel_only_and_reference_noise(ref, codes, reference_draws, tmp_path, capsys):
    """--mel-only writes the flow's mel [80, T]; --noise (the reference's draws, its layout) reproduces the
    reference's mel and waveform."""
    folder = ref[2]
    mel_ref, wave_ref, z, phases, sine_noise = reference_draws
    frames = z.shape[1]
    src = tmp_path / "codes.txt"
    src.write_text(" ".join(map(str, codes[1].tolist())))
    noise = tmp_path / "noise.npz"
    np.savez(noise, z=z, phases=phases, sine_noise=sine_noise)
    decode = ["audio", "decode", str(src)]

    mel = tmp_path / "mel.npy"
    assert main(decode + [str(mel), "--decoder", str(folder), "--mel-only", "--noise", str(noise)]) == 0
    assert f"mel [{MEL}, {frames}]" in capsys.readouterr().out
    assert rel(np.load(mel), mel_ref) < 1e-4
    wav = tmp_path / "out.wav"
    assert main(decode + [str(wav), "--decoder", str(folder), "--noise", str(noise)]) == 0
    wave, _ = sf.read(wav, dtype="float32")
    assert np.abs(wave - wave_ref).max() < 2e-3  # 16-bit PCM, float32 noise of the reference

    seeded = [tmp_path / f"seeded{k}.npy" for k in range(3)]
    for path, seed in zip(seeded, (3, 3, 4)):
        assert main(decode + [str(path), "--decoder", str(folder), "--mel-only", "--seed", str(seed)]) == 0
    a, b, other = (np.load(p) for p in seeded)
    assert a.shape == (MEL, frames) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - other).max() > 1e-2
    assert main(decode + [str(tmp_path / "mel.wav"), "--decoder", str(folder), "--mel-only"]) == 2
    assert "--mel-only writes a .npy file" in capsys.readouterr().err
    np.savez(noise, z=z)
    assert main(decode + [str(tmp_path / "x.wav"), "--decoder", str(folder), "--noise", str(noise)]) == 2
    assert "no 'phases' array" in capsys.readouterr().err
    np.savez(noise, z=z[:, :-1])
    assert main(decode + [str(tmp_path / "x.npy"), "--decoder", str(folder), "--noise", str(noise),
                          "--mel-only"]) == 2
    assert "do not match the utterances' [mel bins, frames]" in capsys.readouterr().err
