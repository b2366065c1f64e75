"""A training run's checkpoints: asynchronous orbax saves of the whole state with the data position, restores,
and the run's parameters read back (to start the next stage) or exported as a reference Hugging Face folder.

A run folder holds `config.json` (the training config) and `checkpoints/<step>/` (orbax's CheckpointManager
layout: `state`, the `TrainState` tree, and `data`, every process's grain iterator position). orbax writes each
into a temporary folder renamed when complete, so after a `kill -9` the run restarts from the last complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from omnidiff_jax.checkpoint import Summary, export_checkpoint
from omnidiff_jax.config import dream_config, token_layout
from omnidiff_jax.files import write_text
from omnidiff_jax.model import OmniModel
from omnidiff_jax.train import data
from omnidiff_jax.train.speech import speech_input_from_config

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
DATA_ITEM = "data"  # each process writes its streams' positions there (grain's process_<i>-of-<n>.json)


def write_config(workdir: Path, cfg: ml_collections.ConfigDict) -> None:
    """Records the run's training config in `workdir` (process 0 only)."""
    if jax.process_index() == 0:
        write_text(workdir / CONFIG_FILE, cfg.to_json(indent=2))


def manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Asynchronous orbax checkpoints in `workdir`/checkpoints, keeping the last `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager((workdir / CHECKPOINTS_DIR).absolute(), options=options)


def save(checkpoints: ocp.CheckpointManager, state, data_state: dict) -> None:
    """Starts an asynchronous save of the train state with the data position `data_state` (an iterator state
    taken when exactly the packs of steps < state.step had been read)."""
    checkpoints.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), **{DATA_ITEM: grain.checkpoint.CheckpointSave(_Snapshot(data_state))}))


def restore(checkpoints: ocp.CheckpointManager, step: int, target, iterator: data.Streams):
    """The state saved at `step`, laid out as `target` (ShapeDtypeStructs with shardings); `iterator` is moved to
    the saved data position, read from every process's file, so that a run resumes on another process count."""
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))))
    iterator.set_state(data.read_positions(Path(checkpoints.directory) / str(step) / DATA_ITEM))
    return restored["state"]


class _Snapshot:
    """A frozen data-iterator state in the form grain's checkpoint handler accepts (JSON bytes)."""

    def __init__(self, state: dict):
        self.state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.state


def load_run_params(workdir: str | os.PathLike, step: int | None = None, shardings: dict | None = None) -> dict:
    """The trainable parameters ({"dream": ...}) of a run folder's latest (or given) complete checkpoint, e.g. to
    start the next stage or to export. Reads only the parameters: as NumPy arrays, or as arrays laid out by
    `shardings` (a tree over some of the saved top-level entries; the rest come back replicated)."""
    folder = (Path(workdir) / CHECKPOINTS_DIR).absolute()
    # what read_only implies, said outright, so that orbax does not warn that it changes them
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    checkpoints = ocp.CheckpointManager(folder, options=options,
                                        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                       DATA_ITEM: grain.checkpoint.CheckpointHandler()})
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint under {folder}")
    saved = checkpoints.item_metadata(step)["state"]
    saved = (saved.tree if hasattr(saved, "tree") else saved)["params"]
    if shardings is None:
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        mesh = next(iter(jax.tree.leaves(shardings))).mesh
        layout = {k: shardings.get(k, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), v))
                  for k, v in saved.items()}
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved, layout)
        args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore({"params": target}, {"params": args}, partial_restore=True)))
    checkpoints.close()
    return restored["state"]["params"]


def export_run(workdir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None, force: bool = False,
               tokenizer_path: str | None = None) -> Summary:
    """Writes a run's latest (or given) checkpoint as a reference Hugging Face folder, through the converter's
    exporter (`checkpoint.export_checkpoint`); a trained speech projector goes out with the encoder of the
    run's `speech.path`. Returns the exporter's summary."""
    cfg = ml_collections.ConfigDict(json.loads((Path(workdir) / CONFIG_FILE).read_text()))
    params = load_run_params(workdir, step)
    speech = None
    if "audio_projection" in params:
        speech = speech_input_from_config(cfg)
        speech = dataclasses.replace(speech, params={**speech.params, "projector": params["audio_projection"]})
    model = OmniModel(dream_config(cfg), token_layout(cfg), params["dream"], tokenizer_path=tokenizer_path,
                      speech=speech)
    return export_checkpoint(model, dst, force=force)


__all__ = ["write_config", "manager", "save", "restore", "load_run_params", "export_run"]
