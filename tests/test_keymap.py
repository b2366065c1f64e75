"""The shared key-map machinery: templates, stacking, shape checks, export, and our safetensors reader/writer."""

import ml_dtypes
import numpy as np
import pytest
import torch

import jax
from omnidiff_jax.convert.keymap import CONV1D, LINEAR, ConversionError, KeyMap, Rule, contiguous, flatten
from omnidiff_jax.convert.sources import in_memory, safetensors_file, write_safetensors

KM = KeyMap((Rule("blocks.{i}.fc.weight", "blocks/fc/kernel", LINEAR),
             Rule("down.{n}.conv.weight", "down_{n}/conv/kernel", CONV1D)),
            drop=((r"ema\..*", "EMA buffers are not used"),))


def shapes(**kw):
    return {k.replace("__", "/"): jax.ShapeDtypeStruct(v, np.float32) for k, v in kw.items()}


def test_load_stacks_layers_and_exports_back():
    rng = np.random.RandomState(0)
    src = {f"blocks.{i}.fc.weight": rng.randn(3, 2).astype(np.float32) for i in range(4)}
    src.update({f"down.{n}.conv.weight": rng.randn(5, 2, 3).astype(np.float32) for n in range(2)})
    src["ema.decay"] = np.ones(1, np.float32)
    target = {"blocks/fc/kernel": jax.ShapeDtypeStruct((4, 2, 3), np.float32),
              "down_0/conv/kernel": jax.ShapeDtypeStruct((3, 2, 5), np.float32),
              "down_1/conv/kernel": jax.ShapeDtypeStruct((3, 2, 5), np.float32)}
    params = KM.load(in_memory(src), target)
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][2], src["blocks.2.fc.weight"].T)
    back = dict(KM.export(params))
    assert set(back) == set(src) - {"ema.decay"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, src[k])


def test_all_problems_in_one_error():
    src = {"blocks.0.fc.weight": (3, 2), "blocks.2.fc.weight": (3, 2), "down.0.conv.weight": (5, 9, 3),
           "stray": (1,)}
    target = {"blocks/fc/kernel": (2, 2, 3), "down_0/conv/kernel": (3, 2, 5), "down_1/conv/kernel": (3, 2, 5)}
    with pytest.raises(ConversionError) as err:
        KM.plan(src, target, "demo.pt")
    msg = str(err.value)
    assert "unexpected key(s) in demo.pt: stray" in msg
    assert "blocks.1.fc.weight" in msg and "down.1.conv.weight" in msg  # missing
    assert "shape mismatch for 'down.0.conv.weight': found (5, 9, 3)" in msg
    assert "layer indices [2] beyond the model's 2" in msg


def test_safetensors_reader_handles_bf16_and_matches_torch(tmp_path):
    from safetensors.torch import load_file, save_file
    t = {"a": torch.randn(4, 3).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int64)}
    save_file(t, tmp_path / "x.safetensors")
    src = safetensors_file(tmp_path / "x.safetensors")
    assert src["a"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(src["a"].read().astype(np.float32), t["a"].float().numpy())
    np.testing.assert_array_equal(src["b"].read(), t["b"].numpy())
    # and our writer produces files torch's safetensors reads bit for bit
    write_safetensors(tmp_path / "y.safetensors", {k: src[k].read() for k in src})
    back = load_file(tmp_path / "y.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_read_tensor_leaves_the_process_memory_once_dropped(tmp_path):
    """Each read maps only its tensor, and the map closes with the array: streaming a checkpoint tensor by tensor
    never keeps the file's pages counted in the process (a map of the whole file kept every page read so far)."""
    write_safetensors(tmp_path / "w.safetensors", {k: np.full((2048, 4096), 1.0, np.float32) for k in "ab"})  # 32 MB
    source = safetensors_file(tmp_path / "w.safetensors")
    before = _file_pages_mb()
    for key in "ab":
        arr = source[key].read()
        assert arr.sum(dtype=np.float64) == arr.size  # touches every page
        held = _file_pages_mb() - before
        del arr
        assert held > 24, held  # resident while in use ...
        assert _file_pages_mb() - before < 4  # ... and gone with the array


@pytest.mark.parametrize("select", [lambda t: t, lambda t: t.T, lambda t: t.T[10:30], lambda t: t.T[:, 5:9],
                                    lambda t: t[3:5, 7:90], lambda t: t.T.reshape(90, 4, 10)[:, 1:3],
                                    lambda t: t[:, ::3], lambda t: t[1:2, 2:3]])
def test_read_part_reads_the_bytes_of_a_view(tmp_path, select):
    """`TensorRef.read_part` (ranged reads of what a key map's view of a tensor covers) gives the view's values,
    reading exactly its bytes (rchar), a slice along the minor axis as that span of each row."""
    arrays = {"f32": np.random.default_rng(0).standard_normal((40, 90)).astype(np.float32),
              "bf16": np.random.default_rng(1).standard_normal((40, 90)).astype(ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "v.safetensors", arrays)
    source = safetensors_file(tmp_path / "v.safetensors")
    for key, array in arrays.items():
        want = np.asarray(select(array))
        before = _rchar()
        got = source[key].read_part(select)
        read = _rchar() - before
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()
        assert want.nbytes <= read < want.nbytes + 1000, (key, read)  # (+ the read of /proc/self/io)


def _rchar() -> int:
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])


def _file_pages_mb() -> float:
    """File pages mapped by this process, in MB: RssFile, plus RssShmem for a temp folder on tmpfs."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem")) / 1024


def test_flatten_paths():
    assert set(flatten({"a": {"b": 1, "c": {"d": 2}}})) == {"a/b", "a/c/d"}


@pytest.mark.parametrize("shape, axes", [((300, 70), (1, 0)), ((6, 50, 40), (2, 0, 1)), ((5, 7, 3, 2), (2, 3, 1, 0)),
                                         ((1200, 600), (1, 0)), ((0, 4), (1, 0)), ((9,), (0,))])  # 1200x600: blocks
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_contiguous_copies_transposed_views_exactly(shape, axes, dtype):
    x = np.random.RandomState(0).randn(*shape).astype(dtype).transpose(axes)
    for out_dtype in (None, np.float32):
        y = contiguous(x, out_dtype)
        assert y.flags.c_contiguous and y.dtype == np.dtype(out_dtype or dtype)
        np.testing.assert_array_equal(y, x.astype(y.dtype))
    already = np.ascontiguousarray(x)
    assert contiguous(already) is already  # nothing to copy
