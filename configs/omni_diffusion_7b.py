"""The released Omni-Diffusion model (its `config_dream_resume.json`): Dream-7B, a 176264-token vocabulary, bf16."""

from omnidiff_jax.configs.base import model_config


def get_config():
    return model_config(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                        num_text=151643, num_audio_codes=16384, num_image_codes=8192, dtype="bfloat16")
