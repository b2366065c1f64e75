"""`omnidiff audio decode CODES OUT.wav --decoder PATH`: GLM-4-Voice speech codes to a 22.05 kHz WAV file, or with
`--mel-only` to the flow's mel spectrogram (.npy); `--noise` decodes with given noise instead of `--seed`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from omnidiff_jax.files import atomic_write

_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")


def register(group) -> None:
    p = group("audio").add_parser(
        "decode", help="speech codes -> 22.05 kHz WAV (GLM-4-Voice flow decoder + HiFT vocoder)",
        description="Decodes one utterance of GLM-4-Voice speech codes to a 16-bit 22050 Hz WAV file, or with "
                    "--mel-only to the flow decoder's mel spectrogram. Decoding is deterministic (eval mode); the "
                    "reference's is not (its flow encoder keeps dropout 0.1 at inference).")
    p.add_argument("codes", help="text file holding the codes: integers separated by spaces/commas (a JSON list "
                   "works) or <|audio_k|> tokens (other text is then ignored); '-' reads standard input")
    p.add_argument("out", help="output path: .wav, or .npy with --mel-only")
    p.add_argument("--decoder", required=True,
                   help="folder of THUDM/glm-4-voice-decoder: config.yaml, flow.pt, hift.pt")
    p.add_argument("--seed", type=int, default=0, help="random seed of the flow noise and the vocoder source")
    p.add_argument("--noise", metavar="NOISE.npz",
                   help="decode with this noise instead, in the reference's layout: z [80, frames] (CFM's start), "
                        "phases [9] and sine_noise [9, 256 frames] (HiFT's sine generator; not needed with "
                        "--mel-only)")
    p.add_argument("--mel-only", action="store_true",
                   help="stop after the flow: write its mel spectrogram, float32 [80, frames], as .npy")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def read_codes(text: str, origin: str) -> list[int]:
    """Codes from text: every <|audio_k|> token if there is one, else the integers in a space/comma list."""
    tokens = _AUDIO_TOKEN.findall(text)
    if tokens:
        return [int(t) for t in tokens]
    codes = []
    for item in re.split(r"[\s,\[\]]+", text.strip()):
        if not item:
            continue
        if not re.fullmatch(r"-?\d+", item):
            raise ValueError(f"{origin}: {item!r} is not an integer speech code")
        codes.append(int(item))
    if not codes:
        raise ValueError(f"{origin}: holds no speech codes")
    return codes


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ValueError(f"{out}: is a folder, not a file path")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: cannot be written: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")


def read_noise(path: Path) -> dict:
    """The arrays of a noise .npz file (see --noise)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such noise file")
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


def run(args) -> int:
    from omnidiff_jax.audio_io import write_wav
    from omnidiff_jax.speech_out import SpeechDecoder, decode_mel, decode_speech, decode_with_noise

    out = Path(args.out)
    _check_output(out, args.overwrite)
    if args.mel_only and out.suffix != ".npy":
        raise ValueError(f"{out}: --mel-only writes a .npy file")
    noise = None if args.noise is None else read_noise(Path(args.noise))
    if args.codes == "-":
        codes = read_codes(sys.stdin.read(), "<stdin>")
    else:
        path = Path(args.codes)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such codes file")
        codes = read_codes(path.read_text(), str(path))
    decoder = SpeechDecoder.load(args.decoder)
    if args.mel_only:
        mel = decode_with_noise(codes, decoder, noise, mel_only=True) if noise else decode_mel([codes], decoder,
                                                                                                seed=args.seed)[0]
        with atomic_write(out, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(mel, np.float32))
        print(f"wrote {out}: mel [{mel.shape[0]}, {mel.shape[1]}] from {len(codes)} codes")
        return 0
    wave = decode_with_noise(codes, decoder, noise) if noise else decode_speech([codes], decoder, seed=args.seed)[0]
    write_wav(out, wave, decoder.sample_rate)
    print(f"wrote {out}: {len(wave) / decoder.sample_rate:.2f} s at {decoder.sample_rate} Hz from {len(codes)} codes")
    return 0
