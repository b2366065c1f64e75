"""Typed views of the ml_collections configs in `configs/`: look a config up by name or path, get dataclasses."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import ml_collections

from omnidiff_jax.models.dream import DreamConfig
from omnidiff_jax.vocab import TokenLayout

BUILTIN = ("omni_diffusion_7b", "small", "tiny")


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
    """A built-in config by name (`tiny`, `small`, `omni_diffusion_7b`) or a config file's path."""
    if name_or_path in BUILTIN:
        return importlib.import_module(f"omnidiff_jax.configs.{name_or_path}").get_config()
    path = Path(name_or_path)
    if path.suffix == ".py" and path.exists():
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    raise ValueError(f"unknown config {name_or_path!r}: expected one of {BUILTIN} or the path of a config .py file")


def dream_config(cfg: ml_collections.ConfigDict) -> DreamConfig:
    """The model section as a frozen `DreamConfig`, checked against the token layout."""
    model = DreamConfig(**cfg.model.to_dict())
    layout = token_layout(cfg)
    if layout.vocab_size != model.vocab_size:
        raise ValueError(f"config vocab_size {model.vocab_size} does not match its token layout "
                         f"({layout.vocab_size} = {layout.num_text} text + 45 specials + "
                         f"{layout.num_audio_codes} speech + {layout.num_image_codes} image codes)")
    if (model.mask_token_id, model.pad_token_id) != (layout.mask, layout.pad):
        raise ValueError(f"config mask/pad ids ({model.mask_token_id}, {model.pad_token_id}) do not match the "
                         f"token layout ({layout.mask}, {layout.pad})")
    return model


def token_layout(cfg: ml_collections.ConfigDict) -> TokenLayout:
    return TokenLayout(**cfg.vocab.to_dict())
