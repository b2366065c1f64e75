"""A random Omni-Diffusion checkpoint on disk for end-to-end tests and benchmarks: a Dream of any config with the
tiny SenseVoice front end (written in the reference layout, then converted), and a tiny random MAGVIT-v2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import save_file

from omnidiff_jax.config import dream_config, token_layout
from omnidiff_jax.configs.base import model_config
from omnidiff_jax.convert.dream import hf_config
from omnidiff_jax.checkpoint import import_checkpoint
from omnidiff_jax.models.magvit import MagvitConfig

from . import dream as dream_ref
from . import sensevoice as speech_ref
from .magvit import random_magvit

TINY_SPEECH = dict(output_size=32, num_heads=2, linear_units=64, num_blocks=3, tp_blocks=2)


def write_random_omni(root: Path, cfg) -> tuple[Path, Path]:
    """Writes root/hf (reference layout), root/converted (ours) and root/magvit for the ml_collections model
    config `cfg` (its image codes must be MAGVIT-v2's 8192); returns (converted folder, MAGVIT folder)."""
    c = hf_config(dream_config(cfg), token_layout(cfg), "float32")
    c["omnidiff_speech"] = TINY_SPEECH
    sv, proj = speech_ref.random_speech(speech_ref.tiny_config(), c["hidden_size"])
    dream_ref.save_hf(dream_ref.random_dream(c), root / "hf", c, extra=speech_ref.omni_state(sv, proj))
    import_checkpoint(root / "hf", root / "converted", progress=False)
    magvit = random_magvit(dataclasses.asdict(MagvitConfig.tiny()))
    (root / "magvit").mkdir()
    save_file({k: v.contiguous() for k, v in magvit.state_dict().items()},
              str(root / "magvit" / "pytorch_model.safetensors"))
    return root / "converted", root / "magvit"


def write_tiny_omni(root: Path) -> tuple[Path, Path]:
    """`write_random_omni` for the end-to-end tests: a 2-layer Dream of width 64 whose vocabulary holds MAGVIT-v2's
    8192 image codes (the tokenizer's LFQ is always 13 bits)."""
    cfg = model_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, num_text=211,
                       num_audio_codes=64, num_image_codes=8192, rope_theta=10_000.0)
    return write_random_omni(root, cfg)
