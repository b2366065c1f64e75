"""`omnidiff audio encode IN.wav --out enc.npy (--sensevoice PATH | --checkpoint PATH)`: speech-input features
through the SenseVoice encoder (and optionally the projector), written as .npy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from omnidiff_jax.files import atomic_write


def register(group) -> None:
    p = group("audio").add_parser(
        "encode", help="speech -> SenseVoice encoder output [T_lfr + 4, 512] (.npy)",
        description="Runs one audio file through the speech-input front end (fbank, LFR, CMVN) and the SenseVoice "
                    "encoder, alone or from an Omni-Diffusion checkpoint, and writes the encodings as float32 .npy "
                    "[T_lfr + 4, 512] (4 prompt rows, then ~16.7 frames per second); with --projector, the LLM-width "
                    "embeddings the model sees.")
    p.add_argument("input", metavar="IN.wav", help="audio file (any format and rate soundfile reads)")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="output .npy path")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sensevoice", metavar="PATH",
                        help="standalone SenseVoiceSmall: its folder (model.pt or model.safetensors, with am.mvn) "
                             "or the weights file with am.mvn beside it")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="Omni-Diffusion checkpoint (its Hugging Face folder, or one of ours) with speech input")
    p.add_argument("--projector", action="store_true",
                   help="also apply the checkpoint's audio projector (with --checkpoint)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="bfloat16: the reference's numerics (default); float32: float32 end to end")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnidiff_jax.checkpoint import load_speech
    from omnidiff_jax.speech_in import load_sensevoice, load_wave

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"{out}: --out must be a .npy path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.projector and args.checkpoint is None:
        raise ValueError("--projector needs --checkpoint (a standalone SenseVoiceSmall has no projector)")
    wave = load_wave(args.input)  # a bad file fails before the weights are read
    if args.sensevoice is not None:
        speech = load_sensevoice(args.sensevoice, dtype=args.dtype)
    else:
        speech = load_speech(args.checkpoint, args.dtype)
        if not args.projector:
            speech = dataclasses.replace(speech, projector=None, params={"encoder": speech.params["encoder"]})
    encodings, lengths = speech([wave])
    result = np.asarray(encodings[0, :lengths[0]], np.float32)
    with atomic_write(out, overwrite=True) as tmp, open(tmp, "wb") as f:
        np.save(f, result)
    print(f"wrote {out}: {result.shape[0]} x {result.shape[1]} float32 ({args.dtype} compute) from "
          f"{len(wave) / 16000:.2f} s of audio")
    return 0
