"""Converters between the reference PyTorch checkpoints and our parameter trees (installed as omnidiff_jax.convert).

Key maps and file formats only: `sources` reads checkpoints lazily; `keymap` is the one key-map mechanism (rules,
shape checks, streaming load, export); one module per checkpoint family holds its rules (`dream`, `sensevoice`,
`magvit`, ...; `omni` groups Dream and the speech input into the Omni-Diffusion checkpoint); `orbax_io` is our
orbax folder format. Reading and writing whole model checkpoints is `omnidiff_jax.checkpoint`'s; nothing here
imports it.
"""
