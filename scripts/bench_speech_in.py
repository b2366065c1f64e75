"""Benchmark: speech input, ours (NumPy front end + jitted JAX SenseVoice encoder and projector) against our PyTorch
reference (tests/torch_ref/sensevoice.py: torch Kaldi fbank, FunASR's LFR/CMVN loops, SenseVoiceSmall +
ResamplerProjector), same random weights, same machine, float32. Reports seconds of audio processed per second for
the front end, the encoder + projector, and both, and the speed-up ours / PyTorch; writes JSON.

    python scripts/bench_speech_in.py [--config small|tiny] [--seconds 10] [--batches 1 8] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse

import benchlib  # noqa: F401  (puts tests/ on the path)
import jax
import numpy as np
import torch

from omnidiff_jax import fbank
from omnidiff_jax.convert.sources import in_memory
from omnidiff_jax.models.projector import ProjectorConfig
from omnidiff_jax.models.sensevoice import SenseVoiceConfig
from omnidiff_jax.speech_in import load_speech_input, load_wave
from torch_ref import sensevoice as ref

SMALL = dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50, tp_blocks=20,
             vocab_size=25055)  # SenseVoiceSmall, Omni-Diffusion `config.yaml`


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["small", "tiny"], default="small")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length (real speech, tiled)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="out/bench_speech_in.json")
    args = ap.parse_args()

    small = args.config == "small"
    c = ref.tiny_config(**(SMALL if small else {}))
    hidden = 3584 if small else 64
    sv, proj = ref.random_speech(c, hidden)
    encoder = (SenseVoiceConfig.small if small else SenseVoiceConfig.tiny)(position_encoding="float32")
    projector = ProjectorConfig(c["output_size"], hidden)
    state = {k: v.numpy() for k, v in ref.omni_state(sv, proj).items()}
    speech = load_speech_input(in_memory(state), encoder, projector, dtype="float32")
    cmvn = torch.from_numpy(np.stack([speech.cmvn.shift, speech.cmvn.scale]))
    clip = np.resize(load_wave(benchlib.DATA / "asr_0.wav"), int(args.seconds * 16000))

    def torch_front(clips):
        return [ref.frontend(torch.from_numpy(w), cmvn) for w in clips]

    def torch_encode(feats):
        with torch.inference_mode():
            return proj(ref.audio_encoder(sv, feats)[0])

    rows = []
    for b in args.batches:
        clips = [clip] * b
        feats, lengths = fbank.wave_features(clips)
        ours = np.asarray(speech.embed(feats, lengths)[0])
        theirs = torch_encode([torch.from_numpy(f[:n]) for f, n in zip(feats, lengths)]).numpy()
        err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())  # encoder + projector, same features
        ours_fns = {
            "front end": lambda: fbank.wave_features(clips),
            "encoder+projector": lambda: jax.block_until_ready(speech.embed(feats, lengths)),
            "both": lambda: jax.block_until_ready(speech(clips)),
        }
        torch_feats = torch_front(clips)
        torch_fns = {
            "front end": lambda: torch_front(clips),
            "encoder+projector": lambda: torch_encode(torch_feats),
            "both": lambda: torch_encode(torch_front(clips)),
        }
        for stage in ours_fns:
            t_ours = benchlib.timeit(ours_fns[stage], reps=args.reps, warmup=1)
            t_torch = benchlib.timeit(torch_fns[stage], reps=args.reps, warmup=1)
            audio = b * args.seconds
            rows.append({"config": args.config, "stage": stage, "batch": b, "ours_s": t_ours, "torch_s": t_torch,
                         "ours_audio_s_per_s": audio / t_ours, "torch_audio_s_per_s": audio / t_torch,
                         "speedup": t_torch / t_ours, "max_rel_err": err})
    benchlib.report(f"Speech input ({args.config}, {args.seconds:g} s clips) on {jax.default_backend()}, float32 "
                    "(audio_s_per_s = seconds of audio per second; speedup = PyTorch time / ours)", rows,
                    ["config", "stage", "batch", "ours_s", "torch_s", "ours_audio_s_per_s", "torch_audio_s_per_s",
                     "speedup", "max_rel_err"], args.json)


if __name__ == "__main__":
    main()
