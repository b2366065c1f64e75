"""MAGVIT-v2 image tokenizer: parity with our PyTorch reference through the converter, LFQ bit order, the
reference preprocessing, real images, checkpoint formats both ways, the CLI, bad input, data parallelism."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from omnidiff_jax import cli
from omnidiff_jax.convert.keymap import ConversionError, flatten
from omnidiff_jax.convert.magvit import config_from_source, magvit_keymap
from omnidiff_jax.convert.sources import CheckpointError, Source, TensorRef
from omnidiff_jax.image import (ImageError, ImageTokenizer, check_codes, load_image, magvit_target, preprocess,
                                read_image, to_uint8, write_png)
from omnidiff_jax.models.magvit import MagvitConfig, lfq_codes, lfq_latents
from omnidiff_jax.sharding import make_mesh
from torch_ref.magvit import random_magvit

KEYS = Path(__file__).resolve().parent / "data" / "keys" / "magvitv2.txt"
TINY = MagvitConfig.tiny()


def rel(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def ref():
    return random_magvit(dataclasses.asdict(TINY), seed=0)


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("magvit") / "pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tok(ckpt):
    return ImageTokenizer.load(ckpt.parent)  # the folder form


@pytest.fixture(scope="module")
def pixels():
    return np.random.RandomState(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- real key list

def test_real_key_list_maps_completely():
    shapes = {}
    for line in KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = re.fullmatch(r"(\S+) \(([\d, ]*)\) \w+", line).groups()
            shapes[name] = tuple(int(d) for d in shape.split(",") if d.strip())
    source = Source({k: TensorRef(k, s, np.dtype(np.float32), "keys", lambda: None) for k, s in shapes.items()},
                    str(KEYS))
    assert config_from_source(source) == MagvitConfig()
    target = magvit_target(MagvitConfig())
    plan = magvit_keymap().plan(shapes, {k: v.shape for k, v in target.items()})
    assert len(plan.entries) == 380 and set(plan.dropped) == {"quantize.embedding", "quantize.power_vals"}
    count = lambda prefix: sum(int(np.prod(v.shape)) for k, v in target.items() if k.startswith(prefix))  # noqa
    assert (count("encoder/"), count("decoder/")) == (55_439_171, 39_947_833)  # the sums over data/keys/magvitv2.txt


# ----------------------------------------------------------------------------------------------- parity

def test_encoder_lfq_decoder_match_reference(ref, tok, pixels):
    with torch.no_grad():
        z_ref = ref.encoder(nchw(pixels)).numpy().transpose(0, 2, 3, 1)
        codes_ref = ref.get_code(nchw(pixels)).numpy()
        images_ref = ref.decode_code(torch.from_numpy(codes_ref)).numpy().transpose(0, 2, 3, 1)
    assert rel(tok.latents(pixels), z_ref) <= 1e-4
    codes = tok.encode_images(pixels)
    assert codes.shape == (2, 16) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, codes_ref)
    images = tok.decode_codes(codes_ref)
    assert images.shape == (2, 64, 64, 3)
    assert rel(images, images_ref) <= 1e-4


def test_lfq_bit_order_and_round_trip(ref):
    codes = np.arange(8192, dtype=np.int32).reshape(2, 4096)
    z = np.asarray(lfq_latents(codes, 64, 64))
    np.testing.assert_array_equal(z.reshape(8192, 13), ref.quantize.embedding.numpy())  # the reference codebook
    np.testing.assert_array_equal(lfq_codes(z), codes)
    np.testing.assert_array_equal(z[0, 0, 1], [-1] * 12 + [1])  # code 1: channel 12 is the least significant bit
    np.testing.assert_array_equal(lfq_codes(np.eye(13, dtype=np.float32)[None, None]), [[4096 >> c for c in range(13)]])
    zero = np.zeros((1, 1, 2, 13), np.float32)
    zero[0, 0, 1, 12] = 1e-30
    np.testing.assert_array_equal(lfq_codes(zero), [[0, 1]])  # exactly 0 is negative; any positive value is 1


# ----------------------------------------------------------------------------------------------- preprocessing

def coordinate_image(width, height):
    """R = x mod 256, G = y mod 256, B = 7: reveals which pixels a crop kept."""
    y, x = np.mgrid[:height, :width]
    return Image.fromarray(np.stack([x % 256, y % 256, np.full_like(x, 7)], -1).astype(np.uint8), "RGB")


def as_uint8(pixels):
    return np.rint((pixels + 1) / 2 * 255).astype(np.int64)


@pytest.mark.parametrize("width, height, left, top", [(261, 256, 2, 0), (263, 256, 4, 0), (256, 259, 0, 2)])
def test_center_crop_rounds_half_to_even(width, height, left, top):
    out = as_uint8(preprocess(coordinate_image(width, height), 256))  # already the right size: no resize
    assert out.shape == (256, 256, 3)
    assert (out[0, 0, 0], out[0, 0, 1], out[0, 0, 2]) == (left, top, 7)


@pytest.mark.parametrize("size", [(640, 480), (480, 640)])
def test_resize_shorter_side_then_crop(size):
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (*size[::-1], 3), dtype=np.uint8))
    expected_size = (341, 256) if size[0] > size[1] else (256, 341)  # int(256 * 640 / 480) = 341
    box = (42, 0, 298, 256) if size[0] > size[1] else (0, 42, 256, 298)  # round(85 / 2) = 42
    expected = np.asarray(image.resize(expected_size, Image.Resampling.BICUBIC).crop(box), np.float32)
    out = preprocess(image, 256)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (expected / 255 - 0.5) / 0.5)


def test_modes_are_converted_and_small_images_upscaled(tmp_path):
    gray = Image.fromarray(np.full((30, 40), 200, np.uint8), "L")
    rgba = Image.fromarray(np.full((30, 40, 4), (10, 20, 30, 0), np.uint8), "RGBA")
    palette = Image.new("P", (40, 30))
    palette.putpalette([90, 80, 70] * 256)
    for name, image, rgb in (("g.png", gray, (200, 200, 200)), ("a.png", rgba, (255, 255, 255)),  # alpha 0: white
                             ("p.png", palette, (90, 80, 70))):
        image.save(tmp_path / name)
        assert read_image(tmp_path / name).mode == "RGB"
        out = as_uint8(load_image(tmp_path / name, 256))  # 40x30 is smaller than 256: upscaled like the reference
        assert out.shape == (256, 256, 3)
        np.testing.assert_array_equal(out[128, 128], rgb)


def test_bad_image_files(tmp_path, assets):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: cannot be read as an image"):
        read_image(tmp_path / "notes.png")
    for name in ("vqa_0.png", "svqa_0.jpg"):
        data = (assets / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(ImageError, match=f"{name}: cannot be read"):
            read_image(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="over PIL's"):
        preprocess(Image.new("RGB", (400_000, 1)), 512)


def test_bad_codes_and_pixels(tok):
    with pytest.raises(ImageError, match=r"codes\[0, 3\] = 8192 is outside the codebook \[0, 8192\)"):
        check_codes([1, 2, 3, 8192])
    with pytest.raises(ImageError, match="= -1 is outside"):
        check_codes([[-1, 0, 0, 0]])
    with pytest.raises(ImageError, match="255 codes per image is not a square"):
        check_codes(np.zeros(255, np.int64))
    with pytest.raises(ImageError, match="must be integers"):
        check_codes(np.zeros(256, np.float32))
    with pytest.raises(ImageError, match=r"shape \[N\] or \[batch, N\]"):
        check_codes(np.zeros((1, 16, 16), np.int32))
    with pytest.raises(ImageError, match="multiples of 16, got shape"):
        tok.encode_images(np.zeros((1, 40, 64, 3), np.float32))


# ----------------------------------------------------------------------------------------------- real images

def test_real_images_at_256(ref, tok, assets, tmp_path):
    paths = [assets / "svqa_0.jpg", assets / "vqa_0.png"]
    pixels = np.stack([load_image(p, 256) for p in paths])
    assert pixels.shape == (2, 256, 256, 3) and pixels.min() >= -1 and pixels.max() <= 1
    codes = tok.encode_files(paths, 256)
    assert codes.shape == (2, 256) and codes.min() >= 0 and codes.max() < 8192
    np.testing.assert_array_equal(tok.encode_images(pixels), codes)  # deterministic
    with torch.no_grad():
        np.testing.assert_array_equal(codes, ref.get_code(nchw(pixels)).numpy())
    images = tok.decode_codes(codes)
    assert images.shape == (2, 256, 256, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(tok.decode_codes(codes), images)
    rgb = to_uint8(images)
    np.testing.assert_array_equal(rgb, (np.clip((images + 1) / 2, 0, 1) * 255).astype(np.uint8))
    write_png(tmp_path / "out.png", rgb[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), rgb[0])
    with pytest.raises(FileExistsError):
        write_png(tmp_path / "out.png", rgb[1])


# ----------------------------------------------------------------------------------------------- checkpoints

def assert_reference_state_dict(path, ref):
    exported, expected = load_file(str(path)), ref.state_dict()
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert exported[key].dtype == tensor.dtype, key
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)


def test_checkpoint_round_trips(ref, tok, ckpt, tmp_path, capsys):
    out = tok.export(tmp_path)
    assert out.name == "pytorch_model.safetensors"
    assert_reference_state_dict(out, ref)  # LFQ buffers included
    with pytest.raises(FileExistsError):
        tok.export(out)
    assert cli.main(["image", "convert", str(ckpt), str(tmp_path / "orbax")]) == 0
    back = ImageTokenizer.load(tmp_path / "orbax")
    assert back.config == TINY
    for (path, a), b in zip(flatten(tok.params).items(), flatten(back.params).values()):
        np.testing.assert_array_equal(a, b, err_msg=path)
    assert cli.main(["image", "convert", str(tmp_path / "orbax"), str(tmp_path / "back.safetensors")]) == 0
    assert_reference_state_dict(tmp_path / "back.safetensors", ref)
    assert cli.main(["image", "convert", str(ckpt), str(tmp_path / "orbax")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_checkpoints(ref, tmp_path):
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del state["decoder.mid.attn_1.q.bias"]
    state["encoder.down.0.block.0.conv2.weight"] = torch.zeros(32, 32, 1, 3)
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError) as err:
        ImageTokenizer.load(tmp_path / "bad.safetensors")
    for fragment in ("decoder.mid.attn_1.q.bias", "encoder.down.0.block.0.conv2.weight", "encoder.extra.weight"):
        assert fragment in str(err.value)
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "dream.safetensors"))
    with pytest.raises(CheckpointError, match="not a MAGVIT-v2 checkpoint"):
        ImageTokenizer.load(tmp_path / "dream.safetensors")


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_encode_decode(tok, ckpt, assets, tmp_path, capsys):
    image = assets / "vqa_0.png"
    codes_file = tmp_path / "codes.npy"
    assert cli.main(["image", "encode", str(image), "--tokenizer", str(ckpt), "--size", "256",
                     "--out", str(codes_file)]) == 0
    codes = np.load(codes_file)
    np.testing.assert_array_equal(codes, tok.encode_files([image], 256)[0])
    assert cli.main(["image", "decode", str(codes_file), str(tmp_path / "out.png"), "--tokenizer", str(ckpt)]) == 0
    with Image.open(tmp_path / "out.png") as out:
        assert (out.size, out.mode) == ((256, 256), "RGB")
    (tmp_path / "bad.txt").write_text(" ".join(["5"] * 255))
    assert cli.main(["image", "decode", str(tmp_path / "bad.txt"), str(tmp_path / "b.png"), "--tokenizer",
                     str(ckpt)]) == 2
    assert "255 codes per image is not a square" in capsys.readouterr().err
    assert cli.main(["image", "decode", str(codes_file), str(tmp_path / "out.png"), "--tokenizer", str(ckpt)]) == 2
    assert "out.png exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- mesh

def test_data_parallel_on_8_devices(tok, ckpt, pixels):
    sharded = ImageTokenizer.load(ckpt, mesh=make_mesh(data=4, fsdp=2))
    leaf = sharded.params["encoder"]["conv_in"]["kernel"]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    x = np.concatenate([pixels, pixels[:1] * 0.5])  # batch 3: padded to 8 over data x fsdp
    codes = sharded.encode_images(x)
    np.testing.assert_array_equal(codes, tok.encode_images(x))
    assert rel(sharded.decode_codes(codes), tok.decode_codes(codes)) <= 1e-5
