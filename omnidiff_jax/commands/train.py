"""`omnidiff train --config FILE [--config.<field>=<value> ...]` and `omnidiff data prepare --config FILE`.

Overrides follow ml_collections' config_flags: `--config.train.steps=100` or `--config.train.steps 100`; the value
is parsed as the field's current type (lists and tuples as Python literals) by `omnidiff_jax.config.load_config`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnidiff_jax import distributed
from omnidiff_jax.config import load_config, token_layout

PREFIX = "--config."
OVERRIDES = ("Any config field can be overridden: --config.<field>=<value> or --config.<field> <value>, e.g. "
             "--config.train.steps=100 --config.data.root=/data")


def register(group) -> None:
    train = group("").add_parser("train", help="train the Dream LLM (masked diffusion) per a training config",
                                 epilog=OVERRIDES)
    train.add_argument("--config", required=True, help="a training config file, e.g. configs/stage1.py")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--profile", metavar="START:STOP", type=_window,
                       help="write a jax.profiler trace of updates START..STOP-1 to WORKDIR/profile")
    train.add_argument("--export", metavar="DST", help="instead of training, write the run's checkpoint (in "
                       "train.workdir) as a reference Hugging Face folder at DST")
    train.add_argument("--step", type=int, help="with --export: this checkpoint step (default: the latest)")
    train.add_argument("--tokenizer", help="with --export: a folder whose tokenizer files to copy alongside")
    train.add_argument("--force", action="store_true", help="with --export: overwrite DST")
    distributed.add_arguments(train)
    train.set_defaults(func=run_train)
    _accept_overrides(train)

    prepare = group("data").add_parser("prepare", help="tokenize a config's jsonl sources into training shards",
                                       epilog=OVERRIDES)
    prepare.add_argument("--config", required=True, help="a training config file, e.g. configs/stage1.py")
    prepare.add_argument("--source", action="append", help="only this source (repeatable; default: all)")
    prepare.add_argument("--strict", action="store_true", help="fail (exit non-zero) at the first bad record, "
                         "including one skipped by an earlier run, instead of skipping it")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(func=run_prepare)
    _accept_overrides(prepare)


def _accept_overrides(parser: argparse.ArgumentParser) -> None:
    """Lets `parser` collect `--config.<field>` arguments into `args.overrides` as (field, text) pairs."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, rest = parse_known(args, namespace)
        namespace.overrides, others = [], []
        rest = iter(rest)
        for arg in rest:
            if not arg.startswith(PREFIX):
                others.append(arg)
            elif "=" in arg:
                namespace.overrides.append(tuple(arg[len(PREFIX):].split("=", 1)))
            else:
                value = next(rest, None)
                if value is None:
                    parser.error(f"{arg} needs a value")
                namespace.overrides.append((arg[len(PREFIX):], value))
        return namespace, others

    parser.parse_known_args = parse_known_args


def _window(text: str) -> tuple[int, int]:
    start, _, stop = text.partition(":")
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
        raise argparse.ArgumentTypeError(f"expected START:STOP with START < STOP (update indices), got {text!r}")
    return int(start), int(stop)


def run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.export:
        from omnidiff_jax.train.checkpoints import export_run

        print(export_run(cfg.train.workdir, args.export, args.step, args.force, args.tokenizer))
        return 0
    distributed.initialize_from_args(args)
    from omnidiff_jax.train.trainer import Trainer

    state = Trainer(cfg).run(progress=not args.no_progress, profile=args.profile)
    print(f"trained to step {int(state.step)}; checkpoints in {Path(cfg.train.workdir) / 'checkpoints'}")
    return 0


def run_prepare(args) -> int:
    from omnidiff_jax.train.data import DataError
    from omnidiff_jax.train.prepare import prepare_source, tokenizers_from_config

    cfg = load_config(args.config, args.overrides)
    names = args.source or sorted(cfg.data.sources)
    unknown = sorted(set(names) - set(cfg.data.sources))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; the config has {sorted(cfg.data.sources)}")
    layout = token_layout(cfg)
    tokenizers = tokenizers_from_config(cfg.prepare, layout)
    p = cfg.prepare
    for name in names:
        src = cfg.data.sources[name]
        if not src.jsonl:
            raise ValueError(f"source {name}: no jsonl files (data.sources.{name}.jsonl)")
        try:
            totals = prepare_source(src.jsonl, Path(cfg.data.root) / src.path, layout, tokenizers,
                                    prefix=src.prefix, shard_size=p.shard_size, batch_size=p.batch_size,
                                    image_sizes=(p.user_image_size, p.image_size), strict=args.strict or p.strict,
                                    progress=not args.no_progress)
        except DataError as e:
            raise DataError(f"source {name}: {e}") from e
        print(f"{name}: {json.dumps(totals)}")
    return 0
