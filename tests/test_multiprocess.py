"""Multi-process runs on one machine through `scripts/launch_local.py` (each process its own CPU devices, gloo
collectives): training on 2 processes x 4 devices against 1 process x 8 devices over the same data x fsdp mesh,
checkpoints resumed on the other process count, a process killed mid-run, and sampling over 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train_data import write_tiny_dataset

from omnidiff_jax import init_model
from omnidiff_jax.checkpoint import export_checkpoint, import_checkpoint
from omnidiff_jax.convert.keymap import flatten
from omnidiff_jax.train.checkpoints import load_run_params

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_local.py"
STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    write_tiny_dataset(root / "data", count=8)
    return {"root": root, "env": {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
                                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}}


def launch(env, processes, *command) -> subprocess.Popen:
    """`omnidiff <command>` as `processes` processes of 8 / processes CPU devices each."""
    return subprocess.Popen([sys.executable, str(LAUNCH), "--processes", str(processes), "--devices-per-process",
                             str(8 // processes), "--timeout", "240", "--", sys.executable, "-m", "omnidiff_jax.cli",
                             *command], env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train(env, processes, workdir) -> subprocess.Popen:
    """`omnidiff train` of the tiny config on mesh data 2 x fsdp 4 with 2 data streams."""
    return launch(env, processes, "train", "--config", str(ROOT / "configs" / "train_tiny.py"), "--no-progress",
                  f"--config.data.root={env['root'] / 'data'}", f"--config.train.workdir={workdir}",
                  f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                  f"--config.train.keep_checkpoints={STEPS}", "--config.train.micro_batch=8", "--config.mesh.data=2",
                  "--config.mesh.fsdp=4", "--config.data.streams=2")


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def complete_checkpoints(workdir) -> list[int]:
    """Steps of the finished checkpoints (orbax writes into a temporary folder, renamed to the step when done)."""
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def metrics(workdir) -> dict[int, dict]:
    lines = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"metrics.jsonl written more than once: steps {steps}"
    return {r["step"]: r for r in lines}


def assert_same_steps(got: dict, want: dict, steps) -> None:
    for step in steps:
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
        assert got[step]["task_loss"].keys() == want[step]["task_loss"].keys(), step
        np.testing.assert_allclose(list(got[step]["task_loss"].values()), list(want[step]["task_loss"].values()),
                                   rtol=1e-6, err_msg=f"step {step}")
        assert got[step]["valid_tokens"] == want[step]["valid_tokens"], step


@pytest.fixture(scope="module")
def single(env):
    """The reference run: one process, 8 devices, from scratch."""
    workdir = env["root"] / "single"
    finish(train(env, 1, workdir))
    return workdir


@pytest.mark.slow
def test_training_moves_between_process_counts_and_survives_a_killed_process(env, single):
    """1 -> 2: the single-process run's step-2 checkpoint resumed on 2 processes x 4 devices (parameters and
    optimizer state resharded, each process's data stream moved to its saved position) gives the same losses;
    one of the 2 processes killed (SIGKILL) after the step-4 checkpoint ends the whole run at once; 2 -> 1: that
    run resumed on one process finishes with the same losses and parameters as the uninterrupted run."""
    workdir = env["root"] / "moved"
    shutil.copytree(single, workdir)
    for step in complete_checkpoints(workdir):
        if step > 2:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    proc = train(env, 2, workdir)
    pids = {}
    for line in proc.stdout:  # launch_local: localhost:PORT, p0 pid N, p1 pid M
        if line.startswith("launch_local:"):
            pids = {int(p.split()[0][1:]): int(p.split()[2]) for p in line.strip().split(", ")[1:]}
            break
    assert set(pids) == {0, 1}
    deadline = time.time() + 240
    while 4 not in complete_checkpoints(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.time()
    out, _ = proc.communicate(timeout=60)
    ended = time.time() - killed
    assert proc.returncode != 0 and ended < 20, (ended, out[-3000:])
    assert "exited with status" in out and "ending the others" in out
    for pid in pids.values():  # no process left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    want, two = metrics(single), metrics(workdir)
    assert 4 <= max(two) < STEPS
    assert_same_steps(two, want, range(3, max(two) + 1))  # trained on 2 processes

    finish(train(env, 1, workdir))
    got = metrics(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_steps(got, want, range(1, STEPS + 1))
    final, reference = flatten(load_run_params(workdir)), flatten(load_run_params(single))
    for key, leaf in reference.items():
        np.testing.assert_allclose(final[key], leaf, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_generate_over_two_processes_matches_one(env, tmp_path):
    """`omnidiff generate --requests` on 2 processes x 4 devices, the batch split over data (2, across the
    processes) and the model over fsdp (4), sampling at temperature 1: the manifest (written by process 0 alone)
    equals a one-process run's on the same mesh through the same launcher. (A run without the launcher uses XLA's
    in-process CPU collectives instead of gloo, whose float sums may round differently.)"""
    requests = tmp_path / "requests.jsonl"
    prompts = ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10])
    requests.write_text("".join(json.dumps({"task": "text", "prompt_ids": p, "id": f"r{i}"}) + "\n"
                                for i, p in enumerate(prompts)))
    common = ["generate", "--config", "tiny", "--requests", str(requests), "--steps", "6", "--gen-length", "12",
              "--temperature", "1", "--seed", "3", "--mesh", "2,4,1"]
    out = finish(launch(env, 2, *common, "--out", str(tmp_path / "two")))
    assert "[p1]" in out
    finish(launch(env, 1, *common, "--out", str(tmp_path / "one")))  # the same collectives (gloo) as the two
    two = (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()
    assert len(two) == len(prompts)
    assert len({tuple(json.loads(line)["ids"]) for line in two}) == len(prompts)  # sampled, not one repeated token
    assert two == (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()


def test_each_process_reads_about_its_own_slices(env, tmp_path):
    """`load_model(path, mesh=...)` with the tensor axis across 2 processes (1 device each): each process reads
    (tests/multiprocess_load.py: rchar of /proc/self/io) little more than the half of each folder it holds. orbax:
    the MLP kernels (64 MB each) are stored in 8 MB chunks, the attention weights one head per chunk; only the
    small embeddings (1.5 MB, a single chunk each) are read whole. safetensors: each slice is read by byte ranges,
    down_proj (split on its stored minor axis) as half of each row."""
    model = init_model("tiny", hidden_size=1024, intermediate_size=16384, num_layers=1)
    export_checkpoint(model, tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "orbax")
    del model
    out = tmp_path / "read.json"
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "--processes", "2", "--devices-per-process", "1",
                             "--timeout", "240", "--", sys.executable, str(ROOT / "tests" / "multiprocess_load.py"),
                             str(tmp_path), str(out), "1,1,2"], env=env["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    finish(proc)
    for i in range(2):
        for kind, r in json.loads(Path(f"{out}.{i}").read_text()).items():
            print(f"process {i} {kind}: read {r['read'] / 1e6:.1f} MB = {r['read'] / r['folder']:.1%} of the folder "
                  f"({r['folder'] / 1e6:.1f} MB), holds {r['held'] / 1e6:.1f} MB")
            assert r["held"] < 0.51 * r["folder"], r
            assert r["held"] <= r["read"] < 0.55 * r["folder"], (kind, r)
