"""A tiny Dream for tests and the demo: 2 layers of width 64, GQA 4/2, a 384-token vocabulary in the real order."""

from omnidiff_jax.configs.base import model_config


def get_config():
    return model_config(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                        num_text=211, num_audio_codes=64, num_image_codes=64, rope_theta=10_000.0)
