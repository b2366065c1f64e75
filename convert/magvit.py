"""Key map between showlab/magvitv2 `pytorch_model.safetensors` and our `Magvit` parameter tree, both ways.

Every key of tests/data/keys/magvitv2.txt maps here: `encoder.*` and `decoder.*` (conv weights
[O, I, kh, kw] -> kernels [kh, kw, I, O]; GroupNorm weight -> scale), while the two LFQ buffers
`quantize.embedding` and `quantize.power_vals` hold no learned values: they are dropped on import (the JAX LFQ
computes them) and written back on export, so the reference's strict loader finds them.

The checkpoint carries no config (its config.json is 66 bytes), so `config_from_source` reads the widths and
depths off the tensor shapes; `KeyMap.plan` then checks every key and shape against that config.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from omnidiff_jax.convert.keymap import CONV2D, IDENTITY, KeyMap, Rule
from omnidiff_jax.convert.sources import CheckpointError, Source, open_source, write_safetensors
from omnidiff_jax.models.magvit import CODE_BITS, MagvitConfig

WEIGHTS_NAME = "pytorch_model.safetensors"  # the file name in the showlab/magvitv2 repository


def _conv_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return Rule(f"{src}.weight", f"{dst}/kernel", CONV2D), Rule(f"{src}.bias", f"{dst}/bias", IDENTITY)


def _norm_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return Rule(f"{src}.weight", f"{dst}/scale", IDENTITY), Rule(f"{src}.bias", f"{dst}/bias", IDENTITY)


def _resnet_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return (*_norm_rules(f"{src}.norm{{n}}", f"{dst}/norm{{n}}"), *_conv_rules(f"{src}.conv{{n}}", f"{dst}/conv{{n}}"),
            *_conv_rules(f"{src}.nin_shortcut", f"{dst}/nin_shortcut"))


def _mid_rules(src: str, dst: str) -> tuple[Rule, ...]:
    attn = [_conv_rules(f"{src}.attn_1.{p}", f"{dst}/attn_1/{p}") for p in ("q", "k", "v", "proj_out")]
    return (*_resnet_rules(f"{src}.block_{{m}}", f"{dst}/block_{{m}}"),
            *_norm_rules(f"{src}.attn_1.norm", f"{dst}/attn_1/norm"), *itertools.chain(*attn))


def magvit_keymap() -> KeyMap:
    """The full key map (the same for every config: level and block indices are template fields)."""
    rules = []
    for side, stage, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        rules += [
            *_conv_rules(f"{side}.conv_in", f"{side}/conv_in"),
            *_resnet_rules(f"{side}.{stage}.{{L}}.block.{{j}}", f"{side}/{stage}_{{L}}_block_{{j}}"),
            *_conv_rules(f"{side}.{stage}.{{L}}.{resample}.conv", f"{side}/{stage}_{{L}}_{resample}"),
            *_mid_rules(f"{side}.mid", f"{side}/mid"),
            *_norm_rules(f"{side}.norm_out", f"{side}/norm_out"),
            *_conv_rules(f"{side}.conv_out", f"{side}/conv_out"),
        ]
    rules += [*_conv_rules("encoder.quant_conv", "encoder/quant_conv"),
              *_conv_rules("decoder.post_quant_conv", "decoder/post_quant_conv")]
    return KeyMap(tuple(rules), drop=(
        (r"quantize\.embedding", "LFQ codebook buffer (+-1 bit patterns), computed by the JAX LFQ"),
        (r"quantize\.power_vals", "LFQ bit weights buffer (2^12 ... 1), computed by the JAX LFQ"),
    ))


def lfq_buffers() -> dict[str, np.ndarray]:
    """The reference LFQ's two buffers: `embedding` [8192, 13] f32 (+1 where bit 12-c is set) and `power_vals`."""
    bits = (np.arange(2 ** CODE_BITS)[:, None] >> np.arange(CODE_BITS - 1, -1, -1)) & 1
    return {"quantize.embedding": (bits * 2 - 1).astype(np.float32),
            "quantize.power_vals": 2 ** np.arange(CODE_BITS - 1, -1, -1, dtype=np.int64)}


def config_from_source(source: Source) -> MagvitConfig:
    """Reads ch, ch_mult and num_res_blocks of both halves off the checkpoint's tensor shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in source:
            raise CheckpointError(f"{source.description}: not a MAGVIT-v2 checkpoint (no tensor {key!r})")
        return source[key].shape

    ch = shape("encoder.conv_in.weight")[0]
    halves = {}
    for side, stage in (("encoder", "down"), ("decoder", "up")):
        mult, blocks = [], []
        while f"{side}.{stage}.{len(mult)}.block.0.conv1.weight" in source:
            level = f"{side}.{stage}.{len(mult)}.block"
            mult.append(shape(f"{level}.0.conv1.weight")[0] // ch)
            blocks.append(sum(1 for _ in itertools.takewhile(lambda j: f"{level}.{j}.conv1.weight" in source,
                                                             itertools.count())))
        shape(f"{side}.{stage}.0.block.0.conv1.weight")  # at least one level
        halves[side] = (tuple(mult), tuple(blocks))
    z = shape("encoder.conv_out.weight")[0]
    if z != CODE_BITS:
        raise CheckpointError(f"{source.description}: encoder.conv_out.weight has {z} output channels; the LFQ "
                              f"needs {CODE_BITS}")
    try:
        return MagvitConfig(ch=ch, encoder_ch_mult=halves["encoder"][0], encoder_num_res_blocks=halves["encoder"][1],
                            decoder_ch_mult=halves["decoder"][0], decoder_num_res_blocks=halves["decoder"][1])
    except ValueError as e:
        raise CheckpointError(f"{source.description}: unsupported MAGVIT-v2 shapes ({e})") from None


def open_checkpoint(path: str | os.PathLike) -> Source:
    """A reference checkpoint: a `.safetensors`/`.pt`/`.bin` file, or a folder holding `pytorch_model.safetensors`."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_NAME).exists():
        path = path / WEIGHTS_NAME
    return open_source(path)


def export_tensors(params) -> Iterator[tuple[str, np.ndarray]]:
    """(reference key, array) for every tensor of a reference state_dict, LFQ buffers included."""
    yield from magvit_keymap().export(params)
    yield from lfq_buffers().items()


def save_reference(params, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes `params` as a reference `pytorch_model.safetensors` (into `path` if it is a folder). Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the reference format is safetensors; give a .safetensors file or a folder")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    write_safetensors(path, dict(export_tensors(params)), metadata={"format": "pt"})
    return path
