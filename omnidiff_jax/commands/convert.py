"""`omnidiff convert import|export|verify`: the reference PyTorch checkpoint <-> our orbax checkpoint folder, and
a check of an orbax folder against the checksums its import recorded."""

from __future__ import annotations

from tqdm import tqdm

from omnidiff_jax.checkpoint import export_checkpoint, import_checkpoint, verify_checkpoint


def register(group) -> None:
    convert = group("convert")

    p = convert.add_parser("import", help="reference Hugging Face checkpoint -> orbax checkpoint folder")
    p.add_argument("src", help="the reference folder (config.json, *.safetensors [+ index], tokenizer files), or "
                               "one .safetensors/.bin/.pt file with config.json beside it")
    p.add_argument("dst", help="the orbax folder to write (self-contained: weights, config, tokenizer files)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: keep the source's)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run_import)

    p = convert.add_parser("export", help="orbax checkpoint folder -> reference Hugging Face folder")
    p.add_argument("src", help="an orbax folder written by `omnidiff convert import`")
    p.add_argument("dst", help="the Hugging Face folder to write: sharded safetensors (<= 5 GB each), index, "
                               "config.json, tokenizer files")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run_export)

    p = convert.add_parser("verify", help="check an orbax folder's parameters against their recorded checksums")
    p.add_argument("dir", help="an orbax folder written by `omnidiff convert import`")
    p.set_defaults(func=run_verify)


class _Bar:
    """tqdm progress over bytes (the rate shows bytes per second) with a tensor count beside it."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __call__(self, tensors: int, nbytes: int):
        self.bar = tqdm(total=nbytes, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024)
        done = 0

        def on_tensor(key: str, n: int) -> None:
            nonlocal done
            done += 1
            self.bar.set_postfix_str(f"{done}/{tensors} tensors", refresh=False)
            self.bar.update(n)

        return on_tensor

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_import(args) -> int:
    bar = _Bar("import")
    try:
        summary = import_checkpoint(args.src, args.dst, dtype=args.dtype, force=args.force, progress=bar)
    finally:
        bar.close()
    print(f"imported {args.src} -> {args.dst}: {summary}")
    return 0


def run_export(args) -> int:
    bar = _Bar("export")
    try:
        summary = export_checkpoint(args.src, args.dst, force=args.force, progress=bar)
    finally:
        bar.close()
    print(f"exported {args.src} -> {args.dst}: {summary}")
    return 0


def run_verify(args) -> int:
    problems = verify_checkpoint(args.dir)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.dir}: every parameter matches its checksum")
    return 0
