"""CLI command modules. Each defines `register(group)`, where `group(name)` returns the argparse subparsers of a
command group (`group("")` is the top level), and sets each parser's `func(args) -> int`. `omnidiff_jax.cli`
discovers every module here."""
