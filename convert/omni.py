"""The Omni-Diffusion checkpoint family: its parameter groups, their key maps, and what an imported folder records.

The model's parameters come in groups, each with its own key map and the source keys it claims: the speech
input (SenseVoice encoder + projector, `model.audio_*`, when the checkpoint has it) and the Dream LLM (the rest).
`has_speech` is the one rule for whether a checkpoint holds the speech input, used by every reader.
`plan_groups` checks every group's keys and shapes before any data is read and reports all problems in one
error. Reading and writing whole checkpoints (import, export, load, verify) is `omnidiff_jax.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import flax.linen as nn
import jax

from omnidiff_jax.convert.dream import dream_keymap
from omnidiff_jax.convert.keymap import ConversionError, KeyMap, Plan, flatten, unflatten
from omnidiff_jax.convert.sensevoice import speech_keymap, speech_target
from omnidiff_jax.convert.sources import CheckpointError, Source, TensorRef
from omnidiff_jax.model import abstract_dream
from omnidiff_jax.models.dream import DreamConfig
from omnidiff_jax.models.projector import ProjectorConfig
from omnidiff_jax.models.sensevoice import SenseVoiceConfig
from omnidiff_jax.vocab import TokenLayout

LLM_GROUP = "dream"  # `OmniModel.params` in the checkpoint layout (layers stacked; `models.dream.unstack_layers`)
SPEECH_GROUP = "speech"  # `OmniModel.speech.params`: {"encoder": ..., "projector": ...}
SPEECH_KEYS = r"model\.audio_(model|projection)\..*"
# Axes an imported folder stores one index per chunk (`chunk_axes`): tensor parallelism splits attention by whole
# heads, and orbax's chunking, which cuts a leaf's longest axes (vocab, embed, mlp), would never reach the few heads.
HEAD_AXES = ("q_heads", "kv_heads")
LAYOUT = 2  # of our parameter tree in an imported folder; 2: the output head is `lm_head/embedding` [V, H]
INDEX_FILE = "model.safetensors.index.json"
# Files of a Hugging Face folder that travel with the weights: configs, tokenizer, remote code.
HF_FILE_PATTERNS = ("*.json", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja")


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A parameter tree of the model (`name` in the checkpoint), its key map, and the source keys it claims."""

    name: str
    keymap: KeyMap
    target: dict[str, jax.ShapeDtypeStruct]  # flat abstract parameters
    claims: str = ".*"  # regex over source keys; each key goes to the first group that claims it
    # flat {path: logical axis name of each dimension} (the LLM's leaves; a leaf without names is replicated)
    axes: dict[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)


Speech = tuple[SenseVoiceConfig, ProjectorConfig]


def has_speech(keys: Iterable[str]) -> bool:
    """Whether a reference checkpoint with these tensor keys holds the speech input (any `model.audio_model.*` or
    `model.audio_projection.*` key; a partial one then fails planning, naming what is missing)."""
    return any(re.fullmatch(SPEECH_KEYS, k) for k in keys)


def dream_group(cfg: DreamConfig) -> ParamGroup:
    """The LLM's parameter group: its shapes and logical axis names from one trace of `Dream(cfg)`."""
    abstract = abstract_dream(cfg)
    axes = {p: tuple(spec) for p, spec in flatten(nn.get_partition_spec(abstract)).items()}
    return ParamGroup(LLM_GROUP, dream_keymap(cfg), flatten(nn.meta.unbox(abstract)), axes=axes)


def param_groups(cfg: DreamConfig, speech: Speech | None = None) -> list[ParamGroup]:
    """The model's parameter groups, in claiming order: the speech input (if any), then the LLM."""
    return ([] if speech is None else [speech_group(speech)]) + [dream_group(cfg)]


def chunk_axes(groups: list[ParamGroup]) -> dict[str, tuple[int, ...]]:
    """{"group/path": dimensions} each leaf is stored one index per chunk along (`orbax_io.CheckpointWriter`):
    its attention head axes."""
    return {f"{g.name}/{p}": dims for g in groups for p, names in g.axes.items()
            if (dims := tuple(i for i, name in enumerate(names) if name in HEAD_AXES))}


def speech_group(speech: Speech) -> ParamGroup:
    """The speech input's parameter group (SenseVoice encoder + projector), claiming `model.audio_*` keys."""
    return ParamGroup(SPEECH_GROUP, speech_keymap(), speech_target(*speech), SPEECH_KEYS)


def speech_configs(raw_config: dict, dtype: str, file: Path) -> Speech:
    """The speech encoder and projector of a reference config.json (`raw_config`, read from `file`):
    SenseVoiceSmall, unless an `omnidiff_speech` field gives the encoder's shape (tiny test checkpoints).
    dtype: the LLM's."""
    try:
        fields = dict(raw_config.get("omnidiff_speech", {}))
        if "prompt_rows" in fields:
            fields["prompt_rows"] = tuple(fields["prompt_rows"])
        encoder = SenseVoiceConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: bad omnidiff_speech field ({e})") from None
    return speech_dtype((encoder, ProjectorConfig(hidden_size=raw_config["hidden_size"])), dtype)


def speech_dtype(speech: Speech, dtype: str) -> Speech:
    """The speech input in the LLM's dtype (a float16 LLM keeps a bfloat16 encoder)."""
    encoder, projector = speech
    dtype = "float32" if dtype == "float32" else "bfloat16"
    return (encoder.replace(dtype=dtype, param_dtype=dtype),
            projector.replace(input_size=encoder.output_size, dtype=dtype, param_dtype=dtype))


def split_source(source: Source, groups: list[ParamGroup]) -> list[Source]:
    """The source's tensors each group claims: every key goes to the first group claiming it (else the last)."""
    owned: list[dict[str, TensorRef]] = [{} for _ in groups]
    claims = [re.compile(g.claims) for g in groups]
    for key, ref in source.items():
        n = next((n for n, c in enumerate(claims) if c.fullmatch(key)), len(groups) - 1)
        owned[n][key] = ref
    return [Source(refs, f"{source.description} ({g.name})") for g, refs in zip(groups, owned)]


def plan_groups(source: Source, groups: list[ParamGroup]) -> list[tuple[ParamGroup, Plan]]:
    """Plans every group on the tensors it claims (`split_source`); raises one error for all problems."""
    plans, problems = [], []
    for group, part in zip(groups, split_source(source, groups)):
        try:
            target_shapes = {p: t.shape for p, t in group.target.items()}
            plan = group.keymap.plan({k: r.shape for k, r in part.items()}, target_shapes, part.description)
            plans.append((group, plan))
        except ConversionError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("\n".join(problems))
    return plans


def split_groups(flat: Mapping) -> dict[str, dict]:
    """{"group/a/b": x} -> {group: nested tree}."""
    groups: dict[str, dict] = {}
    for path, leaf in flat.items():
        group, rest = path.split("/", 1)
        groups.setdefault(group, {})[rest] = leaf
    return {g: unflatten(leaves) for g, leaves in groups.items()}


def hf_files(folder: str | os.PathLike) -> list[Path]:
    """The non-weight files of a Hugging Face folder (configs, tokenizer, remote code), without the index."""
    folder = Path(folder)
    files = {p for pattern in HF_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(p for p in files if not p.name.endswith(".index.json"))


def folder_meta(cfg: DreamConfig, layout: TokenLayout, speech: Speech | None) -> dict:
    """What an imported folder's `omnidiff.json` records about the model (read back by `stored_config`)."""
    return {"layout": LAYOUT, "model": dataclasses.asdict(cfg), "vocab": dataclasses.asdict(layout),
            "speech": speech and {"encoder": dataclasses.asdict(speech[0]), "projector": dataclasses.asdict(speech[1])}}


def stored_config(meta: dict, file: Path) -> tuple[DreamConfig, TokenLayout, Speech | None]:
    """The model an imported folder holds, from its `omnidiff.json` (`meta`, read from `file`)."""
    if meta.get("layout", 1) != LAYOUT:
        raise CheckpointError(f"{file}: parameter layout {meta.get('layout', 1)}, expected {LAYOUT} (the output "
                              "head is now [vocab, hidden]); import the reference checkpoint again with "
                              "`omnidiff convert import`")
    try:
        speech = meta.get("speech")
        if speech is not None:
            encoder = {k: tuple(v) if isinstance(v, list) else v for k, v in speech["encoder"].items()}
            speech = SenseVoiceConfig(**encoder), ProjectorConfig(**speech["projector"])
        return DreamConfig(**meta["model"]), TokenLayout(**meta["vocab"]), speech
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: bad model, vocab or speech entry ({e})") from None


__all__ = ["LLM_GROUP", "SPEECH_GROUP", "SPEECH_KEYS", "HEAD_AXES", "LAYOUT", "INDEX_FILE", "ParamGroup", "Speech",
           "has_speech", "dream_group", "param_groups", "chunk_axes", "speech_group", "speech_configs", "speech_dtype",
           "split_source", "plan_groups", "split_groups", "hf_files", "folder_meta", "stored_config"]
