"""Inputs of every kind: each PIL image mode and each soundfile subtype and channel count decodes to the values
written, checked against values computed here by hand from the stored samples."""

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnidiff_jax.audio_io import AudioError, load_audio
from omnidiff_jax.image import read_image, to_rgb


def pixels(path) -> np.ndarray:
    image = read_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def gray(values) -> np.ndarray:
    """The expected RGB pixels of a row of gray levels."""
    return np.repeat(np.asarray(values, np.uint8)[None, :, None], 3, axis=2)


def on_white(rgb, alpha) -> list[int]:
    """A colour with alpha composited on white, rounded to nearest: c * a / 255 + 255 * (1 - a / 255)."""
    return [int(c * alpha / 255 + 255 * (1 - alpha / 255) + 0.5) for c in rgb]


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tiff"), ("I;16", ".tiff")])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, mode, suffix):
    levels = [0, 257, 1000, 32768, 65535]
    image = Image.new(mode, (len(levels), 1))
    image.putdata(levels)
    image.save(tmp_path / f"g{suffix}")
    assert Image.open(tmp_path / f"g{suffix}").mode.startswith("I;16")  # stored as 16-bit, not converted
    # 65535 is white, 32768 mid-gray: round(v * 255 / 65535)
    np.testing.assert_array_equal(pixels(tmp_path / f"g{suffix}"), gray([0, 1, 4, 128, 255]))


def test_32_bit_integer_grayscale(tmp_path):
    Image.fromarray(np.array([[0, 1000, 65535]], np.int32)).save(tmp_path / "in_range.tiff")
    np.testing.assert_array_equal(pixels(tmp_path / "in_range.tiff"), gray([0, 4, 255]))  # 16-bit range
    Image.fromarray(np.array([[-50, 0, 100_000, 20_000]], np.int32)).save(tmp_path / "wide.tiff")
    # outside 0..65535: min..max -> 0..255, so -50 -> 0, 100000 -> 255, 20000 -> 20050 / 100050 x 255 = 51.1
    np.testing.assert_array_equal(pixels(tmp_path / "wide.tiff"), gray([0, 0, 255, 51]))


def test_float_grayscale(tmp_path):
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)).save(tmp_path / "unit.tiff")
    assert Image.open(tmp_path / "unit.tiff").mode == "F"
    np.testing.assert_array_equal(pixels(tmp_path / "unit.tiff"), gray([0, 64, 128, 255]))  # x 255
    Image.fromarray(np.array([[-1.0, 0.0, 3.0]], np.float32)).save(tmp_path / "wide.tiff")
    np.testing.assert_array_equal(pixels(tmp_path / "wide.tiff"), gray([0, 64, 255]))  # (x + 1) / 4 x 255


def test_alpha_is_composited_on_white(tmp_path):
    colours = [(200, 100, 0, 128), (0, 0, 0, 0), (10, 20, 30, 255)]
    image = Image.new("RGBA", (3, 1))
    image.putdata(colours)
    image.save(tmp_path / "rgba.png")
    want = [on_white(c[:3], c[3]) for c in colours]
    assert want == [[227, 177, 127], [255, 255, 255], [10, 20, 30]]
    np.testing.assert_array_equal(pixels(tmp_path / "rgba.png")[0], want)

    la = Image.new("LA", (2, 1))
    la.putdata([(100, 64), (30, 255)])
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(pixels(tmp_path / "la.png")[0], [on_white([100] * 3, 64), [30] * 3])


def test_palette_and_colour_key_transparency(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    palette.save(tmp_path / "p.png", transparency=1)  # index 1 fully transparent
    np.testing.assert_array_equal(pixels(tmp_path / "p.png")[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]])
    palette.save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(pixels(tmp_path / "opaque.png")[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])

    pa = Image.new("PA", (2, 1))
    pa.putpalette([40, 80, 120, 0, 0, 0])
    pa.putdata([(0, 51), (0, 255)])
    np.testing.assert_array_equal(np.asarray(to_rgb(pa))[0], [on_white([40, 80, 120], 51), [40, 80, 120]])

    keyed = Image.new("RGB", (2, 1))
    keyed.putdata([(1, 2, 3), (9, 9, 9)])
    keyed.save(tmp_path / "keyed.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(pixels(tmp_path / "keyed.png")[0], [[255, 255, 255], [9, 9, 9]])


def test_cmyk_bilevel_and_gray(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(100, 50, 0, 60), (0, 0, 0, 255)])
    cmyk.save(tmp_path / "cmyk.tiff")
    # R = (255 - C)(255 - K) / 255, rounded: (155 x 195, 205 x 195, 255 x 195) / 255
    np.testing.assert_array_equal(pixels(tmp_path / "cmyk.tiff")[0], [[119, 157, 195], [0, 0, 0]])
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    bilevel.save(tmp_path / "one.png")
    np.testing.assert_array_equal(pixels(tmp_path / "one.png"), gray([0, 255]))
    Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(pixels(tmp_path / "l.png"), gray([0, 77, 255]))


# ------------------------------------------------------------------------------------------------ audio

INTS = np.array([0, 1, -1, 12345, -32768, 32767], np.int64)  # 16-bit sample values


@pytest.mark.parametrize("fmt, subtype, stored, scale", [
    ("WAV", "PCM_16", INTS, 2 ** 15),
    ("FLAC", "PCM_16", INTS, 2 ** 15),
    ("WAV", "PCM_24", INTS * 256 + 7, 2 ** 23),  # 24-bit values the 16-bit ones cannot hold
    ("FLAC", "PCM_24", INTS * 256 + 7, 2 ** 23),
    ("WAV", "PCM_32", INTS * 65536 + 12345, 2 ** 31),
    ("AIFF", "PCM_S8", INTS // 256, 2 ** 7),
])
def test_integer_subtypes_scale_by_their_width(tmp_path, fmt, subtype, stored, scale):
    bits = {"PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32}[subtype]
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, (stored << (32 - bits)).astype(np.int32), 8000, subtype=subtype, format=fmt)  # exact values
    wave, sr = load_audio(path, target_sr=None)
    assert sr == 8000 and wave.dtype == np.float32
    np.testing.assert_array_equal(wave, (stored / scale).astype(np.float32))


def test_unsigned_8_bit(tmp_path):
    stored = np.array([128, 0, 255, 200], np.int64)  # unsigned bytes: 128 is silence
    path = tmp_path / "u8.wav"
    sf.write(path, ((stored - 128) << 24).astype(np.int32), 8000, subtype="PCM_U8")
    with open(path, "rb") as f:
        assert list(f.read()[-4:]) == stored.tolist()  # the bytes on disk
    np.testing.assert_array_equal(load_audio(path, target_sr=None)[0], ((stored - 128) / 128).astype(np.float32))


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_float_subtypes_are_kept(tmp_path, subtype):
    values = np.array([0.0, 0.1, -0.7, 1.5, -2.0])  # floats are not clipped to [-1, 1], as torchaudio reads them
    sf.write(tmp_path / "f.wav", values, 16000, subtype=subtype)
    np.testing.assert_array_equal(load_audio(tmp_path / "f.wav", target_sr=None)[0], values.astype(np.float32))


def test_companded_subtypes_decode_close(tmp_path):
    t = np.arange(800) / 8000
    values = 0.5 * np.sin(2 * np.pi * 440 * t)
    for subtype in ("ULAW", "ALAW"):
        sf.write(tmp_path / f"{subtype}.wav", values, 8000, subtype=subtype)
        wave = load_audio(tmp_path / f"{subtype}.wav", target_sr=None)[0]
        assert np.abs(wave - values).max() < 0.02, subtype  # 8-bit companding: a few per cent near the peak


def test_channels_are_averaged_or_one_is_taken(tmp_path):
    left, right = np.array([1000, -2000, 300], np.int16), np.array([3000, 2000, -301], np.int16)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    mean = load_audio(tmp_path / "stereo.wav", target_sr=None)[0]  # speech input: the reference's mean(0)
    np.testing.assert_array_equal(mean, [(1000 + 3000) / 2 / 32768, 0.0, (300 - 301) / 2 / 32768])
    first = load_audio(tmp_path / "stereo.wav", target_sr=None, channel=0)[0]  # speech codes: audio[0]
    np.testing.assert_array_equal(first, (left / 32768).astype(np.float32))
    with pytest.raises(AudioError, match="2 channel.*no channel 2"):
        load_audio(tmp_path / "stereo.wav", channel=2)
    six = np.arange(6, dtype=np.int16)[None, :] * 1000 + np.array([[0], [10]], np.int16)
    sf.write(tmp_path / "six.wav", six, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "six.wav", target_sr=None)[0],
                                  (np.array([2500, 2510]) / 32768).astype(np.float32))
