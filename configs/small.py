"""A ~110M-parameter Dream for CPU benchmarks: 12 layers of width 768, GQA 12/4, a 10k-token vocabulary."""

from omnidiff_jax.configs.base import model_config


def get_config():
    return model_config(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2816,
                        num_text=8192, num_audio_codes=1024, num_image_codes=1024)
