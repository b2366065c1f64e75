"""The ml_collections configs in `configs/`: look one up by name or path, apply `--config.<field>=<value>` overrides,
get typed views (dataclasses)."""

from __future__ import annotations

import ast
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
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            return module.get_config()
        except Exception as e:  # noqa: BLE001 -- any error of the user's config file, named
            raise ValueError(f"{path}: cannot load the config ({type(e).__name__}: {e})") from e
    raise ValueError(f"unknown config {name_or_path!r}: expected one of {BUILTIN} or the path of a config .py file")


def load_config(name_or_path: str, overrides=()) -> ml_collections.ConfigDict:
    """`get_config(name_or_path)` with `(dotted field, text)` overrides applied (`--config.<field>=<text>` on the
    command line), each parsed as the field's current type."""
    cfg = get_config(name_or_path)
    for field, text in overrides:
        apply_override(cfg, field, text)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets `cfg.<field>` from `text`, parsed as the field's current type."""
    *parents, name = field.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"--config.{field}: no config section {'.'.join(parents[:i + 1])}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ValueError(f"--config.{field}: no such field")
    node[name] = _parse(text, node[name], field)


def _parse(text: str, current, field: str):
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, (int, float)):
            return type(current)(ast.literal_eval(text)) if isinstance(current, float) else int(text)
        if isinstance(current, (list, tuple)):
            return type(current)(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{field}: {text!r} is not a valid {type(current).__name__}") from None
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"--config.{field} is a section; set one of its fields ({', '.join(current)})")
    return text


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
