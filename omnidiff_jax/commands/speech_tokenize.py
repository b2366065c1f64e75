"""`omnidiff audio tokenize IN.wav --tokenizer PATH [--out codes.npy]`: speech -> GLM-4-Voice codes at 12.5 Hz."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from omnidiff_jax.files import atomic_write


def register(group) -> None:
    p = group("audio").add_parser(
        "tokenize", help="speech -> GLM-4-Voice codes (12.5 Hz, ids in [0, 16384))",
        description="Tokenizes one audio file with the GLM-4-Voice speech tokenizer. The file is resampled to "
                    "16 kHz and cut into 30 s segments whose codes are concatenated. Without --out the codes "
                    "are printed, space-separated.")
    p.add_argument("input", metavar="IN.wav", help="audio file (any format and rate soundfile reads)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="THUDM/glm-4-voice-tokenizer folder (config.json + model.safetensors)")
    p.add_argument("--out", metavar="FILE", help="write the codes here: .npy for an int32 array, else text")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="at most N 30 s segments per device call (default 8; a clip under 30 s runs at batch 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnidiff_jax.audio_io import load_audio
    from omnidiff_jax.speech_tokenizer import SAMPLE_RATE, SpeechTokenizer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = None if args.out is None else Path(args.out)
    if out is not None:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out}: folder {out.parent} does not exist")
    wave, _ = load_audio(args.input, SAMPLE_RATE, channel=0)  # a bad file fails before the checkpoint is read
    codes, lengths = SpeechTokenizer.load(args.tokenizer, batch_size=args.batch_size).tokenize([wave])
    codes = codes[0, :lengths[0]]
    text = " ".join(map(str, codes.tolist())) + "\n"
    if out is None:
        sys.stdout.write(text)
        return 0
    with atomic_write(out, overwrite=True) as tmp:
        if out.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, codes)
        else:
            tmp.write_text(text)
    print(f"{len(codes)} codes -> {out}", file=sys.stderr)
    return 0
