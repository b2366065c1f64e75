"""`omnidiff image encode|decode|convert`: images <-> MAGVIT-v2 codes, and tokenizer checkpoint conversion."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from omnidiff_jax.files import atomic_write
from omnidiff_jax.image import SIZES, ImageError, ImageTokenizer, check_codes, to_uint8, write_png

TOKENIZER_HELP = ("MAGVIT-v2 checkpoint: showlab/magvitv2's pytorch_model.safetensors, the folder holding it, "
                  "or a folder written by `omnidiff image convert`")


def register(group) -> None:
    image = group("image")

    p = image.add_parser("encode", help="image file -> MAGVIT-v2 codes")
    p.add_argument("image", help="input image (any format PIL reads; converted to RGB)")
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("--size", type=int, choices=SIZES, default=512,
                   help="square resolution: 512 (user images, 32x32 = 1024 codes) or 256 (generated images, "
                        "16x16 = 256 codes); default 512")
    p.add_argument("--out", help="write the codes here (.npy: int32 [N]; otherwise text) instead of printing them")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_encode)

    p = image.add_parser("decode", help="MAGVIT-v2 codes -> PNG")
    p.add_argument("codes", help="codes file: .npy of shape [N] or [1, N], or text of N integers; N a square")
    p.add_argument("out", help="output PNG")
    p.add_argument("--tokenizer", required=True, help=TOKENIZER_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(func=run_decode)

    p = image.add_parser("convert", help="reference safetensors <-> our orbax folder")
    p.add_argument("source", help=TOKENIZER_HELP)
    p.add_argument("dest", help="a path ending in .safetensors writes the reference format; anything else an "
                                "orbax folder")
    p.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    p.set_defaults(func=run_convert)


def read_codes(path: str | os.PathLike) -> np.ndarray:
    """Codes from a .npy file or a text file of whitespace/comma-separated integers, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such codes file")
    if path.suffix == ".npy":
        try:
            codes = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ImageError(f"{path}: cannot be read as a .npy array ({e})") from None
    else:
        words = path.read_text(errors="replace").replace(",", " ").split()
        try:
            codes = np.array([int(w) for w in words], dtype=np.int64)
        except ValueError as e:
            raise ImageError(f"{path}: expected whitespace-separated integer codes ({e})") from None
    codes = check_codes(codes, str(path))
    if codes.shape[0] != 1:
        raise ImageError(f"{path}: holds {codes.shape[0]} images' codes; decode takes one")
    return codes


def run_encode(args: argparse.Namespace) -> int:
    codes = ImageTokenizer.load(args.tokenizer).encode_files([args.image], args.size)[0]
    side = math.isqrt(codes.size)
    if args.out is None:
        print("\n".join(" ".join(map(str, row)) for row in codes.reshape(side, side)))
        return 0
    with atomic_write(args.out, args.overwrite) as tmp, open(tmp, "wb") as f:
        if args.out.endswith(".npy"):
            np.save(f, codes)
        else:
            np.savetxt(f, codes.reshape(side, side), fmt="%d")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    codes = read_codes(args.codes)
    images = ImageTokenizer.load(args.tokenizer).decode_codes(codes)
    write_png(args.out, to_uint8(images[0]), overwrite=args.overwrite)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    tokenizer = ImageTokenizer.load(args.source)
    if args.dest.endswith(".safetensors"):
        tokenizer.export(args.dest, overwrite=args.overwrite)
    else:
        tokenizer.save(args.dest, overwrite=args.overwrite)
    return 0
