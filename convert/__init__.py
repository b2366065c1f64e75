"""Converters between the reference PyTorch checkpoints and our parameter trees (installed as omnidiff_jax.convert).

`sources` reads checkpoints lazily; `keymap` is the one key-map mechanism (rules, shape checks, streaming load,
export); one module per checkpoint family holds its rules (`dream`, ...).
"""
