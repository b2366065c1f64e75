"""Errors a user can cause end as one line `omnidiff: error: ...` naming what is at fault, with exit status 2;
`--debug` adds the traceback. Faults of the training data: stale prepared shards, an empty source, a truncated
shard, a full disk."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.errors import JaxRuntimeError

from omnidiff_jax import cli
from omnidiff_jax.convert.sources import write_safetensors
from omnidiff_jax.pipeline import describe_error
from omnidiff_jax.train import data

CONFIG = "configs/train_tiny.py"
SOURCES = ("t2i", "tts", "vqa")  # train_tiny's sources; here all text-only, so no media tokenizer runs


def record(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]}) + "\n"


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `omnidiff: error:` line."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("omnidiff: error: "), lines
    return lines[0]


def data_args(tmp_path, *extra) -> list[str]:
    """--config and overrides pointing train_tiny's three sources at jsonl files in tmp_path/raw."""
    args = ["--config", CONFIG, f"--config.data.root={tmp_path / 'data'}"]
    args += [f"--config.data.sources.{s}.jsonl=['{tmp_path / 'raw' / s}.jsonl']" for s in SOURCES]
    return args + list(extra)


def write_records(tmp_path, lines: dict[str, str] | None = None) -> None:
    (tmp_path / "raw").mkdir(exist_ok=True)
    for s in SOURCES:
        text = (lines or {}).get(s, "".join(record(f"{s} question {i}", f"answer {i}") for i in range(4)))
        (tmp_path / "raw" / f"{s}.jsonl").write_text(text)


def prepare(tmp_path, *extra) -> int:
    return cli.main(["data", "prepare", *data_args(tmp_path, "--no-progress", *extra)])


def train(tmp_path) -> int:
    return cli.main(["train", *data_args(tmp_path, "--no-progress", f"--config.train.workdir={tmp_path / 'run'}",
                                         "--config.train.micro_batch=8")])  # the session's 8 CPU devices


# ------------------------------------------------------------------------------------------------ checkpoints

def test_missing_src_names_it(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "checkpoint"
    assert cli.main(["convert", "import", str(missing), str(tmp_path / "dst")]) == 2
    line = error_line(capsys)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "dst").exists()


def test_wrong_type_in_config_json_names_the_key(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["DreamModel"], "hidden_size": "64",
                                                 "intermediate_size": 128, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "vocab_size": 1000}))
    write_safetensors(src / "model.safetensors", {"model.embed_tokens.weight": np.zeros((1000, 64), np.float32)})
    assert cli.main(["convert", "import", str(src), str(tmp_path / "dst")]) == 2
    line = error_line(capsys)
    assert "config.json" in line and "hidden_size" in line and "'64'" in line


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "nope"
    run = subprocess.run([sys.executable, "-m", "omnidiff_jax.cli", "convert", "import", str(missing),
                          str(tmp_path / "dst"), "--debug"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.startswith("Traceback (most recent call last):")
    assert run.stderr.splitlines()[-1] == f"omnidiff: error: {missing}: does not exist"
    quiet = subprocess.run([sys.executable, "-m", "omnidiff_jax.cli", "convert", "import", str(missing),
                            str(tmp_path / "dst")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and quiet.stderr == f"omnidiff: error: {missing}: does not exist\n"


def test_a_bug_is_one_line_too_with_status_1(tmp_path, capsys, monkeypatch):
    def broken(*args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("omnidiff_jax.commands.train.load_config", broken)
    assert cli.main(["train", "--config", CONFIG]) == 1
    line = error_line(capsys)
    assert "internal error" in line and "TypeError: unsupported operand" in line and "--debug" in line


def test_device_out_of_memory_is_a_user_error():
    with pytest.raises(JaxRuntimeError) as e:
        jnp.zeros((1 << 40,), jnp.float32).block_until_ready()  # 4 TiB
    fixable, message = describe_error(e.value)
    assert fixable and message.startswith("out of device memory (RESOURCE_EXHAUSTED") and "\n" not in message


# ------------------------------------------------------------------------------------------------ config and files

@pytest.mark.parametrize("args, message", [
    (["--config", "no/such/config.py"], "no/such/config.py: no such config file"),
    (["--config", CONFIG, "--config.train.steps=many"], "--config.train.steps: 'many' is not a valid int"),
    (["--config", CONFIG, "--config.train.stepz=3"], "--config.train.stepz: no such field"),
])
def test_config_errors(tmp_path, capsys, args, message):
    assert cli.main(["train", *args]) == 2
    assert error_line(capsys) == f"omnidiff: error: {message}"


def test_broken_config_file_names_it(tmp_path, capsys):
    (tmp_path / "cfg.py").write_text("def get_config(:\n")
    assert cli.main(["train", "--config", str(tmp_path / "cfg.py")]) == 2
    assert f"{tmp_path / 'cfg.py'}: cannot load the config (SyntaxError" in error_line(capsys)


def test_out_that_is_a_file_or_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--task", "t2i", "--text", "a cat",
                     "--out", str(tmp_path / "taken")]) == 2
    assert str(tmp_path / "taken") in error_line(capsys)
    write_records(tmp_path)
    assert cli.main(["data", "prepare", *data_args(tmp_path, "--no-progress", f"--config.data.root={tmp_path / 'taken'}")]) == 2
    assert "Not a directory" in error_line(capsys)


# ------------------------------------------------------------------------------------------------ training data

def test_empty_source_fails_at_prepare_and_at_train_start(tmp_path, capsys):
    write_records(tmp_path, {"vqa": "{broken\n" + json.dumps({"messages": []}) + "\n"})
    assert prepare(tmp_path) == 2
    err = capsys.readouterr()
    line = err.err.splitlines()[-1]
    assert line.startswith("omnidiff: error: source vqa: ") and "0 samples" in line
    assert "skipped" in line and "bad_record" in line
    assert "t2i: " in err.out and "tts: " in err.out  # the sources before it were prepared
    assert train(tmp_path) == 2
    line = error_line(capsys)
    assert str(tmp_path / "data" / "vqa") in line and "0 samples" in line


def test_truncated_or_damaged_shard_names_the_file(tmp_path, capsys):
    write_records(tmp_path)
    assert prepare(tmp_path) == 0
    capsys.readouterr()
    shard = tmp_path / "data" / "t2i" / "shard-00000.array_record"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    assert train(tmp_path) == 2
    line = error_line(capsys)
    assert str(shard) in line and "not a readable shard" in line
    assert prepare(tmp_path) == 0  # prepare notices the shard is not the one it wrote and makes it again
    assert shard.read_bytes() == whole

    damaged = bytearray(whole)  # same size, a flipped byte inside the first chunk: found when read
    damaged[100] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    samples = data.open_source(shard.parent)
    with pytest.raises(data.DataError, match=f"{shard}: damaged shard"):
        samples[0]


def test_stale_prepare_is_redone_and_strict_fails(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_records(tmp_path, {"vqa": record("q", "a") + json.dumps({
        "messages": [{"role": "user", "content": "<|image|> what?"}, {"role": "assistant", "content": "a cat"}],
        "images": [str(raw / "cat.png")]}) + "\n"})
    assert prepare(tmp_path, "--config.prepare.shard_size=1") == 0
    first = capsys.readouterr().out
    assert '"missing_file": 1' in first
    assert prepare(tmp_path, "--config.prepare.shard_size=1", "--strict") == 2  # skipped earlier: still an error
    assert "cat.png not found" in error_line(capsys)

    # the missing image appears: the second shard of vqa is redone (here its tokenizer is missing, so it fails
    # naming what to configure; before, the old shard with its skipped record was reused)
    (raw / "cat.png").write_bytes(b"png")
    assert prepare(tmp_path, "--config.prepare.shard_size=1", "--source", "vqa") == 2
    assert "no tokenizer" in error_line(capsys)

    # records edited: the edited shard is redone; records removed: their shards go
    (raw / "vqa.jsonl").write_text(record("q", "a") + record("q2", "an edited answer"))
    assert prepare(tmp_path, "--config.prepare.shard_size=1", "--source", "vqa") == 0
    out = json.loads(capsys.readouterr().out.split("vqa: ", 1)[1])
    assert out["samples"] == 2 and out["skipped"]["missing_file"] == 0
    texts = [bytes(i for i in s["input_ids"].tolist() if i < 128) for s in data.open_source(tmp_path / "data" / "vqa")]
    assert any(b"an edited answer" in t for t in texts)
    (raw / "vqa.jsonl").write_text(record("q", "a"))
    assert prepare(tmp_path, "--config.prepare.shard_size=1", "--source", "vqa") == 0
    assert sorted(p.name for p in (tmp_path / "data" / "vqa").glob("shard-*")) == [
        "shard-00000.array_record", "shard-00000.json"]


def _full_disk_tmpfs(root):
    """The command with `root` on a 64 KiB tmpfs in a private mount namespace (needs unprivileged namespaces)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("unshare -rm (user and mount namespaces) is not available here")
    root.mkdir()
    return lambda cmd: ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs "{root}" && exec "$@"',
                        "sh", *cmd]


def _file_size_limit(root):
    """The command with a 64 KiB file size limit: writes past it fail with EFBIG (Python ignores SIGXFSZ)."""
    limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16)); " \
            "os.execv(sys.argv[1], sys.argv[1:])"
    return lambda cmd: [sys.executable, "-c", limit, *cmd]


@pytest.mark.parametrize("limit, message", [(_full_disk_tmpfs, "No space left on device"),
                                            (_file_size_limit, "File too large")])
def test_full_disk_while_preparing(tmp_path, limit, message):
    write_records(tmp_path)
    wrap = limit(tmp_path / "data")
    cmd = wrap([sys.executable, "-m", "omnidiff_jax.cli", "data", "prepare", "--source", "t2i",
                *data_args(tmp_path, "--no-progress")])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr
    shard = tmp_path / "data" / "t2i" / "shard-00000.array_record"
    assert run.stderr.startswith(f"omnidiff: error: cannot write {shard}: ") and message in run.stderr
    assert not any((tmp_path / "data" / "t2i").glob("*shard-*"))  # nothing half-written, no temp file left
