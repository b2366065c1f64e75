"""ml_collections configs. Each module's `get_config()` returns a ConfigDict; `omnidiff_jax.config` gives typed views.

Built-in names: `omni_diffusion_7b` (the released model), `small` (~110M, benchmarks), `tiny` (tests).
"""
