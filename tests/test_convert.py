"""Checkpoint conversion: reference Hugging Face folder -> orbax folder -> reference folder, through the shared key
maps. Tiny random checkpoints come from our PyTorch reference (tests/torch_ref/dream.py, upstream names) plus
speech-input keys of the real naming; every bad input of issue 3 gets a clear error."""

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.torch import load_file, save_file

from omnidiff_jax import checkpoint
from omnidiff_jax.checkpoint import (export_checkpoint, import_checkpoint, load_model, load_speech,
                                     verify_checkpoint)
from omnidiff_jax.cli import main
from omnidiff_jax.convert import orbax_io
from omnidiff_jax.convert.dream import AUTO_MAP
from omnidiff_jax.convert.keymap import ConversionError, flatten
from omnidiff_jax.convert.sources import CheckpointError
from omnidiff_jax.model import param_shardings
from omnidiff_jax.sharding import make_mesh
from torch_ref import sensevoice as sensevoice_ref
from torch_ref.dream import DreamModel, random_dream, save_hf, tiny_hf_config

SPEECH = dict(output_size=32, num_heads=2, linear_units=64, num_blocks=3, tp_blocks=2)  # SenseVoiceConfig.tiny()
CTC = {"model.audio_model.model.ctc.ctc_lo.weight", "model.audio_model.model.ctc.ctc_lo.bias"}
TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 8}', "generation_config.json": '{"top_k": 50}',
                   "tokenization_dream.py": "# remote code\n"}


def write_reference(folder, model, speech, config, dtype=torch.float32, shards=3):
    """A reference-style folder: sharded safetensors (LLM and speech-input keys), config and tokenizer files."""
    save_hf(model, folder, {**config, "omnidiff_speech": SPEECH}, dtype=dtype, shards=shards,
            extra=sensevoice_ref.omni_state(*speech, dtype))
    for name, text in TOKENIZER_FILES.items():
        (Path(folder) / name).write_text(text)
    return Path(folder)


def reference_state(model, speech, dtype):
    """Every tensor of the checkpoint written by `write_reference`."""
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    return {**state, **sensevoice_ref.omni_state(*speech, dtype)}


def tensors(folder):
    out = {}
    for shard in Path(folder).glob("*.safetensors"):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def ref():
    """(config.json dict, PyTorch Dream, (SenseVoiceSmall, projector)) with random weights."""
    config = tiny_hf_config(max_position_embeddings=4096)  # not the default: the field must be carried
    speech = sensevoice_ref.random_speech(sensevoice_ref.tiny_config(), config["hidden_size"])
    return config, random_dream(config), speech


@pytest.fixture(scope="module")
def f32(ref, tmp_path_factory):
    """(reference folder, orbax folder, import summary) for a float32 checkpoint."""
    config, model, speech = ref
    root = tmp_path_factory.mktemp("f32")
    src = write_reference(root / "hf", model, speech, config)
    return src, root / "orbax", import_checkpoint(src, root / "orbax")


@pytest.fixture(scope="module")
def bf16(ref, tmp_path_factory):
    """(reference folder, orbax folder) for a bfloat16 checkpoint, like the released one."""
    config, model, speech = ref
    root = tmp_path_factory.mktemp("bf16")
    src = write_reference(root / "hf", model, speech, config, dtype=torch.bfloat16, shards=2)
    import_checkpoint(src, root / "orbax")
    return src, root / "orbax"


def test_import_then_load_gives_the_reference_logits(ref, f32):
    config, model, speech = ref
    src, dst, summary = f32
    state = reference_state(model, speech, torch.float32)
    assert summary.tensors == len(state) - len(CTC)
    assert summary.parameters == sum(v.numel() for k, v in state.items() if k not in CTC)
    assert summary.dtypes == ("float32",)
    assert set(summary.dropped) == CTC and all("CTC" in why for why in summary.dropped.values())

    loaded = load_model(dst)
    assert loaded.config.max_position_embeddings == 4096
    ids = np.random.RandomState(0).randint(0, config["vocab_size"], (2, 12))
    with torch.no_grad():
        want = model.forward_dream(torch.tensor(ids)).numpy()
    got = np.asarray(loaded.logits(ids))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the tokenizer and other non-weight files travel along, so the folder is self-contained
    assert loaded.tokenizer_path is not None
    for name, text in TOKENIZER_FILES.items():
        assert (Path(loaded.tokenizer_path) / name).read_text() == text

    # loading the reference folder directly converts through the same key maps: the same parameters, bit for bit
    direct = load_model(src)
    assert loaded.speech.encoder == direct.speech.encoder and loaded.speech.projector == direct.speech.projector
    for ours, theirs in ((loaded.params, direct.params), (loaded.speech.params, direct.speech.params)):
        theirs = flatten(theirs)
        assert flatten(ours).keys() == theirs.keys()
        for path, leaf in flatten(ours).items():
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(theirs[path]), err_msg=path)


def test_speech_input_alone_from_either_form(ref, f32, tmp_path):
    """`load_speech` reads only the speech input, from the reference folder or its import, as load_model does."""
    config, model, _ = ref
    want = flatten(load_model(f32[1]).speech.params)
    for path in f32[:2]:
        speech = load_speech(path, "float32")
        assert speech.encoder.output_size == SPEECH["output_size"] and flatten(speech.params).keys() == want.keys()
        for key, leaf in flatten(speech.params).items():
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[key]), err_msg=key)
    llm_only = _save(tmp_path / "llm_only", dict(model.state_dict()), config)
    with pytest.raises(CheckpointError, match="holds no speech input"):
        load_speech(llm_only, "float32")

def test_dtype_kept_by_default_and_cast_on_request(ref, bf16, tmp_path, caplog):
    config, model, speech = ref
    src, dst = bf16
    stored = orbax_io.stored_leaves(dst)
    assert {str(s.dtype) for s in stored.values()} == {"bfloat16"}
    loaded = load_model(dst)
    assert loaded.config.param_dtype == "bfloat16" and loaded.speech.encoder.param_dtype == "bfloat16"

    with caplog.at_level("INFO"):
        summary = import_checkpoint(src, tmp_path / "f32", dtype="float32")
    assert "dropping model.audio_model.model.ctc.ctc_lo.weight" in caplog.text
    assert summary.dtypes == ("float32",)
    cast = load_model(tmp_path / "f32")
    assert cast.config.param_dtype == "float32" and cast.speech.encoder.param_dtype == "float32"
    want = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(cast.params["embed_tokens"]["embedding"]), want)


def test_export_round_trip_is_bit_identical(ref, bf16, tmp_path):
    config, model, speech = ref
    src, dst = bf16
    out = tmp_path / "back"
    summary = export_checkpoint(dst, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    back = {}
    for shard in shards:
        part = load_file(shard)
        assert shard.stat().st_size <= 40_000 + 4096 or len(part) == 1  # the cap, or one tensor bigger than it
        assert all(index["weight_map"][k] == shard.name for k in part)
        back.update(part)
    original = {k: v for k, v in reference_state(model, speech, torch.bfloat16).items() if k not in CTC}
    assert set(back) == set(original) and summary.tensors == len(original)  # all but the unused CTC head
    for key, tensor in original.items():
        assert back[key].dtype == torch.bfloat16 and back[key].shape == tensor.shape, key
        assert torch.equal(back[key].view(torch.int16), tensor.view(torch.int16)), key
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in original.values())

    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "Dream" and hf["auto_map"] == AUTO_MAP and hf["torch_dtype"] == "bfloat16"
    assert hf["max_position_embeddings"] == config["max_position_embeddings"] == 4096
    assert hf["omnidiff_speech"] == SPEECH
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    reloaded = DreamModel(hf)  # the PyTorch reference takes the exported LLM weights as they are
    reloaded.load_state_dict({k: v for k, v in back.items() if not k.startswith("model.audio_")}, strict=True)

    # params in memory export the same tensors
    export_checkpoint(load_model(dst), tmp_path / "from_memory")
    again = tensors(tmp_path / "from_memory")
    assert set(again) == set(original)
    assert all(torch.equal(again[k].view(torch.int16), original[k].view(torch.int16)) for k in original)


def _save(folder, tensors, config):
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_key_problems_listed_together(ref, tmp_path):
    config, model, speech = ref
    state = reference_state(model, speech, torch.float32)
    del state["model.audio_projection.mlp.2.weight"]
    del state["model.layers.1.mlp.up_proj.weight"], state["lm_head.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    state["model.vision_tower.weight"] = torch.zeros(2)
    src = _save(tmp_path / "bad", state, {**config, "omnidiff_speech": SPEECH})
    with pytest.raises(ConversionError) as err:
        import_checkpoint(src, tmp_path / "out")
    msg = str(err.value)
    assert "missing key(s)" in msg and "model.layers.1.mlp.up_proj.weight" in msg and "lm_head.weight" in msg
    assert "model.audio_projection.mlp.2.weight" in msg  # the speech group's problems come in the same error
    assert "unexpected key(s)" in msg and "model.vision_tower.weight" in msg
    assert "shape mismatch for 'model.layers.0.self_attn.q_proj.weight': found (3, 64)" in msg
    assert not (tmp_path / "out").exists()


def test_import_and_load_agree_on_what_holds_a_speech_input(ref, tmp_path):
    """One rule for both readers: a projector without its encoder is a speech input with missing keys, refused
    with the same error by the import and by load_model (neither drops the projector silently)."""
    config, model, speech = ref
    state = {k: v for k, v in reference_state(model, speech, torch.float32).items()
             if not k.startswith("model.audio_model.")}
    src = _save(tmp_path / "projector_only", state, {**config, "omnidiff_speech": SPEECH})
    errors = []
    for read in (lambda: import_checkpoint(src, tmp_path / "out"), lambda: load_model(src)):
        with pytest.raises(ConversionError, match="missing key") as err:
            read()
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "model.audio_model.model." in errors[0] and "(speech)" in errors[0]

def test_broken_files_are_named(ref, f32, tmp_path):
    src = f32[0]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    def copy(name):
        folder = tmp_path / name
        folder.mkdir()
        for f in src.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    truncated = copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:len(data) - 100])
    corrupt = copy("corrupt")
    (corrupt / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    missing = copy("missing")
    (missing / shard).unlink()
    for folder, words in ((truncated, "truncated"), (corrupt, "corrupt"), (missing, "do not exist")):
        with pytest.raises(CheckpointError, match=words) as err:
            import_checkpoint(folder, tmp_path / "out")
        assert shard in str(err.value)
        assert not (tmp_path / "out").exists()


def test_folder_from_an_older_layout_is_refused_with_the_remedy(f32, tmp_path):
    """A folder imported when the output head was stored [hidden, vocab] says so, instead of a missing key."""
    old = tmp_path / "old"
    shutil.copytree(f32[1], old)
    meta = json.loads((old / orbax_io.META_FILE).read_text())
    assert meta.pop("layout") == 2
    (old / orbax_io.META_FILE).write_text(json.dumps(meta))
    for load in (load_model, lambda path: export_checkpoint(path, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="parameter layout 1, expected 2.*omnidiff convert import"):
            load(old)


def test_existing_destination_needs_force_and_interruptions_leave_nothing(f32, tmp_path):
    src = f32[0]
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        import_checkpoint(src, dst)

    def interrupt_midway(tensors, nbytes):
        seen = []

        def on_tensor(key, n):
            seen.append(key)
            if len(seen) == tensors // 2:
                raise KeyboardInterrupt
        return on_tensor

    with pytest.raises(KeyboardInterrupt):
        import_checkpoint(src, dst, force=True, progress=interrupt_midway)
    assert (dst / "keep.txt").read_text() == "mine"  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # and no half-written sibling is left

    import_checkpoint(src, dst, force=True)
    assert not (dst / "keep.txt").exists() and orbax_io.is_checkpoint(dst)
    with pytest.raises(CheckpointError, match="overlaps"):
        import_checkpoint(src, src / "inside", force=True)
    with pytest.raises(CheckpointError, match="not an omnidiff orbax checkpoint"):
        verify_checkpoint(src)  # a reference folder is not an orbax folder


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_single_files_and_pickles_weights_only(ref, tmp_path):
    config, model, _ = ref
    want = model.model.norm.weight.detach().numpy()
    single = _save(tmp_path / "st", dict(model.state_dict()), config) / "model.safetensors"
    good = tmp_path / "pt"
    good.mkdir()
    torch.save(model.state_dict(), good / "model.pt")
    (good / "config.json").write_text(json.dumps(config))
    for n, path in enumerate((single, good / "model.pt")):  # config.json is read from beside the file
        import_checkpoint(path, tmp_path / f"out{n}")
        np.testing.assert_array_equal(np.asarray(load_model(tmp_path / f"out{n}").params["norm"]["weight"]), want)

    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "code-ran"
    with open(evil / "model.bin", "wb") as f:
        pickle.dump({"lm_head.weight": _Payload(str(marker))}, f)
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.bin"):
        import_checkpoint(evil / "model.bin", tmp_path / "from_evil")
    assert not marker.exists()


@pytest.mark.parametrize("form", [1, 0], ids=["orbax", "reference"])
def test_sharded_load_on_8_devices(f32, form):
    """Each device's slices, from the orbax folder (its chunks) or the reference folder (ranged reads of the
    safetensors, rows split on their minor axis included), equal the unsharded load's."""
    single = flatten(load_model(f32[1]).params)
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    model = load_model(f32[form], mesh=mesh)
    stacked = flatten(param_shardings(model.config, mesh))
    assert sum(not s.is_fully_replicated for s in stacked.values()) >= 10
    for path, leaf in flatten(model.params).items():
        # a layer's leaf "layers/i/..." is sharded like the stacked leaf "layers/..." over its other axes
        layer_path = re.sub(r"^layers/\d+/", "layers/", path)
        spec = stacked[layer_path].spec[1:] if layer_path != path else stacked[path].spec
        want = NamedSharding(mesh, PartitionSpec(*spec))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (path, leaf.sharding, want)
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(single[path])[shard.index], err_msg=path)
    for leaf in jax.tree.leaves(model.speech.params):  # the small speech input is replicated on the mesh
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_import_stores_one_attention_head_per_chunk(f32):
    """A process's heads are whole chunks of the orbax folder (a restore reads whole chunks); other leaves are
    stored in chunks of at most `orbax_io.CHUNK_BYTES` (here, one each)."""
    stored = f32[1] / orbax_io.PARAMS_DIR / "state"
    chunks = {d.name: json.loads((d / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
              for d in stored.iterdir() if (d / "zarr.json").is_file()}
    for name, shape in chunks.items():
        whole = json.loads((stored / name / "zarr.json").read_text())["shape"]
        heads = {"q_proj.kernel": 2, "k_proj.kernel": 2, "v_proj.kernel": 2, "o_proj.kernel": 1,
                 "q_proj.bias": 1, "k_proj.bias": 1, "v_proj.bias": 1}.get(name.split("self_attn.")[-1])
        assert shape == [1 if i == heads else n for i, n in enumerate(whole)], (name, shape, whole)


def test_folder_with_other_chunks_loads_on_a_mesh(f32, tmp_path, monkeypatch):
    """A folder imported before the chunks followed the heads (each leaf one chunk) restores onto a mesh the same:
    a restore reads the chunk shapes each array records."""
    monkeypatch.setattr(orbax_io, "CHUNK_BYTES", 1 << 40)
    monkeypatch.setattr(checkpoint, "chunk_axes", lambda groups: {})
    import_checkpoint(f32[0], tmp_path / "old")
    stored = tmp_path / "old" / orbax_io.PARAMS_DIR / "state" / "dream.layers.self_attn.q_proj.kernel" / "zarr.json"
    meta = json.loads(stored.read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    new, old = (flatten(load_model(path, mesh=mesh).params) for path in (f32[1], tmp_path / "old"))
    for path, leaf in new.items():
        assert old[path].sharding == leaf.sharding, path
        np.testing.assert_array_equal(np.asarray(old[path]), np.asarray(leaf), err_msg=path)


def test_cli(f32, tmp_path, capsys):
    src = f32[0]
    assert main(["convert", "import", str(src), str(tmp_path / "ox"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr()
    assert "imported" in out.out and f"{f32[2].tensors} tensors" in out.out and "bfloat16" in out.out
    assert "dropped 2 tensor(s): SenseVoice CTC head" in out.out
    assert "tensors" in out.err  # the progress bar counts tensors beside bytes per second
    assert main(["convert", "import", str(src), str(tmp_path / "ox")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "export", str(tmp_path / "ox"), str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out
    assert jax.tree.leaves(load_model(tmp_path / "hf").params)[0].dtype == ml_dtypes.bfloat16


def test_leaf_by_leaf_saves_in_the_background(f32, tmp_path, monkeypatch, caplog):
    """Many background saves in a row (as for a 7B model): they must not trip over each other, and orbax has
    nothing to warn about (it would, about the plain zarr3 layout, were its two warnings not filtered)."""
    monkeypatch.setattr("omnidiff_jax.checkpoint.BATCH_BYTES", 50_000)
    with caplog.at_level(logging.WARNING):
        import_checkpoint(f32[0], tmp_path / "ox")
        single = flatten(load_model(f32[1]).params)
        restored = flatten(load_model(tmp_path / "ox").params)
    for path, leaf in restored.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(single[path]), err_msg=path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_background_writer_bounds_its_queue_and_raises_its_errors(tmp_path, monkeypatch):
    """`make_room` holds the caller until what is queued fits the budget; a write that fails in the background is
    raised to the caller at its next call, and no folder is left behind."""
    written, real_save = [], orbax_io.ocp.partial.save

    def slow_save(path, tree):
        time.sleep(0.1)  # a slow disk: the caller would run ahead if nothing held it
        if "boom" in tree:
            raise OSError("No space left on device")
        real_save(path, tree)
        written.append(next(iter(tree)))

    monkeypatch.setattr(orbax_io.ocp.partial, "save", slow_save)
    arrays = {f"a{i}": np.full((1000,), i, np.float32) for i in range(4)}  # 4 kB each
    with orbax_io.writing(tmp_path / "ok", pending_bytes=6000) as ckpt:
        for n, (name, array) in enumerate(arrays.items()):
            ckpt.make_room(array.nbytes)  # 4 kB more fit only once the queue is empty
            assert written == list(arrays)[:n]
            ckpt.add_params({name: array})
    for late in (lambda: ckpt.add_params({"late": arrays["a0"]}), ckpt.wait):  # an error, not a silent loss or hang
        with pytest.raises(CheckpointError, match="already written"):
            late()
    got = orbax_io.restore(tmp_path / "ok", {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in arrays.items()})
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)

    with pytest.raises(OSError, match="No space left"):
        with orbax_io.writing(tmp_path / "bad") as ckpt:
            ckpt.add_params({"boom": arrays["a0"]})
            ckpt.wait()
    with pytest.raises(OSError, match="No space left"):
        with orbax_io.writing(tmp_path / "bad") as ckpt:
            ckpt.add_params({"boom": arrays["a0"]})
            ckpt.make_room(1 << 40)  # returns once the queue is empty: with the error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def _leaf_file(folder, leaf="dream.lm_head.embedding"):
    """The one chunk file of a small leaf of an orbax folder (plain zarr3: params/state/<leaf>/c/...)."""
    (file,) = [p for p in (folder / "params" / "state" / leaf / "c").rglob("*") if p.is_file()]
    return file


def _missing_chunk(folder):
    _leaf_file(folder).unlink()


def _truncated_chunk(folder):
    file = _leaf_file(folder)
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


DAMAGE = {  # what is done to an intact folder, and the words its one-line error must hold
    "missing chunk": (_missing_chunk, "parameter dream/lm_head/embedding: NOT_FOUND"),
    "truncated chunk": (_truncated_chunk, "parameter dream/lm_head/embedding: DATA_LOSS"),
    "missing zarr.json": (lambda f: (f / "params/state/dream.norm.weight/zarr.json").unlink(),
                          "parameter dream/norm/weight has no array metadata"),
    "missing PyTree index": (lambda f: (f / "params/state/_METADATA").unlink(), "_METADATA is missing"),
    "missing omnidiff.json": (lambda f: (f / orbax_io.META_FILE).unlink(), "no omnidiff.json"),
    "corrupt omnidiff.json": (lambda f: (f / orbax_io.META_FILE).write_text('{"format": "omnidiff-orbax", '),
                              "omnidiff.json: invalid JSON"),
}


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no stray asyncio tracebacks
def test_damaged_folder_gives_one_line_naming_it(kind, f32, tmp_path, capfd):
    damage, words = DAMAGE[kind]
    folder = tmp_path / "damaged"
    shutil.copytree(f32[1], folder)
    damage(folder)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert str(folder) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)
    capfd.readouterr()
    assert main(["convert", "verify", str(folder)]) != 0
    out = capfd.readouterr()
    lines = (out.out + out.err).splitlines()
    assert lines and all(str(folder) in line for line in lines), lines  # every line names the folder
    assert any(words in line for line in lines) and "Traceback" not in out.err and "driver" not in out.err
    assert len(lines) <= 2, lines


def test_verify_detects_a_flipped_byte(f32, tmp_path, capsys):
    assert verify_checkpoint(f32[1]) == []
    assert main(["convert", "verify", str(f32[1])]) == 0 and "every parameter matches" in capsys.readouterr().out
    folder = tmp_path / "flipped"
    shutil.copytree(f32[1], folder)
    file = _leaf_file(folder)
    data = bytearray(file.read_bytes())
    data[100] ^= 0x01  # one bit of a weight: the chunk still reads, with a different value
    file.write_bytes(bytes(data))
    (problem,) = verify_checkpoint(folder)
    assert "parameter dream/lm_head/embedding: checksum" in problem and str(folder) in problem
    assert main(["convert", "verify", str(folder)]) == 1
    assert "dream/lm_head/embedding" in capsys.readouterr().out
    assert np.asarray(load_model(folder).params["lm_head"]["embedding"]).any()  # loads unless asked to verify
    with pytest.raises(CheckpointError, match="dream/lm_head/embedding: checksum"):
        load_model(folder, verify=True)
    with pytest.raises(CheckpointError, match="needs an orbax folder"):
        load_model(f32[0], verify=True)


# Imports src into dst in a child process that sends itself `signal` once half the tensors are written.
SIGNAL_MIDWAY = """
import os, signal, sys
from omnidiff_jax.checkpoint import import_checkpoint

def progress(tensors, nbytes):
    seen = []
    def on_tensor(key, n):
        seen.append(key)
        if len(seen) == tensors // 2:
            os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    return on_tensor

import_checkpoint(sys.argv[1], sys.argv[2], progress=progress)
"""


def _import_killed_midway(src, dst, signal_name):
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-c", SIGNAL_MIDWAY, str(src), str(dst), signal_name], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_9_during_import_then_reimport_cleans_up(f32, tmp_path):
    dst = tmp_path / "ckpt"
    killed = _import_killed_midway(f32[0], dst, "SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (leftover,) = tmp_path.iterdir()  # a kill -9 leaves the staging folder, nothing at dst
    assert leftover.name.startswith("ckpt.tmp-") and any(leftover.rglob("zarr.json"))
    import_checkpoint(f32[0], dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the next import into dst removed it
    assert verify_checkpoint(dst) == []


@pytest.mark.slow
def test_sigterm_during_import_leaves_nothing(f32, tmp_path):
    dst = tmp_path / "ckpt"
    terminated = _import_killed_midway(f32[0], dst, "SIGTERM")
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_source_and_wrong_config_types_are_named(ref, tmp_path, capsys):
    config, model, _ = ref
    missing = tmp_path / "nowhere" / "Omni-Diffusion"
    with pytest.raises(CheckpointError, match=f"{missing}: does not exist"):
        import_checkpoint(missing, tmp_path / "out")
    assert main(["convert", "import", str(missing), str(tmp_path / "out")]) == 2
    assert f"{missing}: does not exist" in capsys.readouterr().err
    for key, value, words in (("hidden_size", "64", "must be an integer, got '64'"),
                              ("num_hidden_layers", 0, "must be positive, got 0"),
                              ("rms_norm_eps", None, "must be a number, got None")):
        src = _save(tmp_path / key, dict(model.state_dict()), {**config, key: value})
        for read in (lambda: import_checkpoint(src, tmp_path / "out"), lambda: load_model(src)):
            with pytest.raises(CheckpointError) as err:
                read()
            assert str(err.value) == f"{src / 'config.json'}: {key} {words}"
    assert not (tmp_path / "out").exists()
