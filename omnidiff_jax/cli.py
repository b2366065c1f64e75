"""The `omnidiff` command line. Commands live in `omnidiff_jax.commands.*`, one module per area.

Every error ends as one line on stderr, `omnidiff: error: ...`, and a non-zero exit status: 2 for what the user
can fix (bad values, files and folders, damaged data or checkpoints, a full disk, device memory), 1 for anything
else (a bug: the line says so), 130 for Ctrl-C. `pipeline.describe_error` tells the two kinds apart and words the
line, as it does a failed request's error. `--debug` prints the traceback before the line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

from omnidiff_jax import commands
from omnidiff_jax.pipeline import describe_error


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
    _add_debug_flag(parser, default=False)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, default) -> None:
    """`--debug` on `parser` and every (sub)command under it, so it may follow the command too."""
    parser.add_argument("--debug", action="store_true", default=default, help="print the traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, default=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("omnidiff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every error becomes one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        fixable, message = describe_error(e)
        if not fixable:
            message += " (rerun with --debug for the traceback)"
        print(f"omnidiff: error: {message}", file=sys.stderr)
        return 2 if fixable else 1


if __name__ == "__main__":
    sys.exit(main())
