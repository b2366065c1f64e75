"""`omnidiff audio decode CODES OUT.wav --decoder PATH`: GLM-4-Voice speech codes to a 22.05 kHz WAV file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

_AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")


def register(group) -> None:
    p = group("audio").add_parser(
        "decode", help="speech codes -> 22.05 kHz WAV (GLM-4-Voice flow decoder + HiFT vocoder)",
        description="Decodes one utterance of GLM-4-Voice speech codes to a 16-bit 22050 Hz WAV file.")
    p.add_argument("codes", help="text file holding the codes: integers separated by spaces/commas (a JSON list "
                   "works) or <|audio_k|> tokens (other text is then ignored); '-' reads standard input")
    p.add_argument("out", help="output .wav path")
    p.add_argument("--decoder", required=True,
                   help="folder of THUDM/glm-4-voice-decoder: config.yaml, flow.pt, hift.pt")
    p.add_argument("--seed", type=int, default=0, help="random seed of the flow noise and the vocoder source")
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


def run(args) -> int:
    from omnidiff_jax.audio_io import write_wav
    from omnidiff_jax.speech_out import SpeechDecoder, decode_speech

    out = Path(args.out)
    _check_output(out, args.overwrite)
    if args.codes == "-":
        codes = read_codes(sys.stdin.read(), "<stdin>")
    else:
        path = Path(args.codes)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such codes file")
        codes = read_codes(path.read_text(), str(path))
    decoder = SpeechDecoder.load(args.decoder)
    (wave,) = decode_speech([codes], decoder, seed=args.seed)
    write_wav(out, wave, decoder.sample_rate)
    print(f"wrote {out}: {len(wave) / decoder.sample_rate:.2f} s at {decoder.sample_rate} Hz from {len(codes)} codes")
    return 0
