"""The `omnidiff` command line. Commands live in `omnidiff_jax.commands.*`, one module per area."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from omnidiff_jax import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnidiff", description="Omni-Diffusion in JAX: convert, generate, train, "
                                     "eval, demo, and the image/speech tokenizers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {"": top}

    def group(name: str) -> argparse._SubParsersAction:
        if name not in groups:
            p = top.add_parser(name, help=f"{name} commands")
            groups[name] = p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
        return groups[name]

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(group)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"omnidiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
