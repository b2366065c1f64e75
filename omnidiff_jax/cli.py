"""The `omnidiff` command line. Commands live in `omnidiff_jax.commands.*`, one module per area.

Every error ends as one line on stderr, `omnidiff: error: ...`, and a non-zero exit status: 2 for what the user
can fix (bad values, files and folders, damaged data or checkpoints, a full disk, device memory), 1 for anything
else (a bug: the line says so), 130 for Ctrl-C. `--debug` prints the traceback before the line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

from jax.errors import JaxRuntimeError

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
        status, message = describe(e)
        print(f"omnidiff: error: {message}", file=sys.stderr)
        return status


def describe(error: Exception) -> tuple[int, str]:
    """(exit status, one-line message) for an error ending a command: 2 for errors the user can fix, 1 for bugs."""
    if isinstance(error, OSError) and error.strerror:
        files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return 2, one_line(f"{files}: {error.strerror}" if files else error.strerror)
    if isinstance(error, (ValueError, OSError)):
        return 2, one_line(str(error) or type(error).__name__)
    if isinstance(error, JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
        return 2, one_line(f"out of device memory ({str(error).splitlines()[0]}); use a smaller batch or length")
    if isinstance(error, MemoryError):
        return 2, "out of host memory"
    return 1, one_line(f"internal error, {type(error).__name__}: {error} (rerun with --debug for the traceback)")


def one_line(message: str, limit: int = 2000) -> str:
    """`message` on one line ("; " between its lines), cut to `limit` characters."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


if __name__ == "__main__":
    sys.exit(main())
