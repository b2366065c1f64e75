"""`omnidiff audio features IN.wav [--out feats.npy]`: SenseVoice front-end features of an audio file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omnidiff_jax import fbank
from omnidiff_jax.files import atomic_write
from omnidiff_jax.speech_in import load_wave


def register(group) -> None:
    p = group("audio").add_parser(
        "features", help="fbank + LFR + CMVN features [T_lfr, 560] of an audio file (prints statistics or "
        "writes .npy)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", type=Path, help="audio file (any rate and channel count soundfile reads)")
    p.add_argument("--out", type=Path, help="write the float32 features here as .npy")
    p.add_argument("--cmvn", type=Path, help="Kaldi am.mvn file (default: the built-in SenseVoiceSmall statistics)")
    p.add_argument("--dither", type=float, default=0.0, help="Kaldi dither; the reference used 1.0 (random features)")
    p.add_argument("--seed", type=int, help="seed for the dither noise")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.out is not None and args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to overwrite it")
    cmvn = fbank.read_am_mvn(args.cmvn) if args.cmvn is not None else fbank.SENSEVOICE_CMVN
    wave = load_wave(args.input)
    feats = fbank.features(wave, cmvn, args.dither, args.seed)
    print(f"{args.input}: {wave.size / fbank.SAMPLE_RATE:.2f} s at 16 kHz -> features {feats.shape[0]} x "
          f"{feats.shape[1]} float32 ({fbank.num_frames(wave.size)} fbank frames, LFR 7/6)")
    print(f"  min {feats.min():.4f}  max {feats.max():.4f}  mean {feats.mean():.4f}  std {feats.std():.4f}  "
          f"({cmvn})")
    if args.out is not None:
        with atomic_write(args.out, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.save(f, feats)
        print(f"  wrote {args.out}")
    return 0
