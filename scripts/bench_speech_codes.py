"""Benchmark: speech -> GLM-4-Voice codes, ours (SpeechTokenizer) against our PyTorch reference pipeline
(transformers' WhisperFeatureExtractor + tests/torch_ref/whisper_vq.py), same random weights, same machine, float32.
Times the whole path from 16 kHz waveforms to codes, and reports the real-time factor (seconds of audio per
second) of each and the speed-up ours/PyTorch; writes JSON.

    python scripts/bench_speech_codes.py [--config glm4voice|tiny] [--seconds 8] [--batches 1 8] [--json PATH]
"""

from __future__ import annotations

import argparse

import benchlib  # noqa: F401  (puts tests/ on the path)
import jax
import numpy as np
import torch

from omnidiff_jax.audio_io import load_audio
from omnidiff_jax.convert.sources import in_memory
from omnidiff_jax.convert.whisper_vq import whisper_vq_keymap, whisper_vq_target
from omnidiff_jax.models.whisper_vq import WhisperVQConfig
from omnidiff_jax.speech_tokenizer import SpeechTokenizer
from torch_ref import whisper_vq as ref

GLM4VOICE = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
                 pooling_position=16, quantize_position=16, quantize_vocab_size=16384)  # the released config.json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["glm4voice", "tiny"], default="glm4voice")
    ap.add_argument("--seconds", type=float, default=8.0, help="clip length (real speech, tiled)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default="out/bench_speech_codes.json")
    args = ap.parse_args()

    glm = args.config == "glm4voice"
    model = ref.random_whisper_vq(ref.tiny_config(**(GLM4VOICE if glm else {})))
    config = WhisperVQConfig.glm4voice() if glm else WhisperVQConfig.tiny()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = whisper_vq_keymap().load(in_memory(state), whisper_vq_target(config), dtype="float32")
    fe = ref.feature_extractor()
    speech, _ = load_audio(benchlib.DATA / "asr_0.wav")
    n = int(args.seconds * 16000)
    clip = np.resize(speech, n)

    rows = []
    for b in args.batches:
        clips = [clip] * b
        tokenizer = SpeechTokenizer(config, params, batch_size=b)
        ours = tokenizer.tokenize(clips)
        with torch.inference_mode():
            theirs = ref.extract_speech_token(model, fe, clips)
        agree = float(np.mean(ours[0][0, :ours[1][0]] == np.array(theirs[0])))
        t_ours = benchlib.timeit(lambda: tokenizer.tokenize(clips), reps=args.reps, warmup=0)
        with torch.inference_mode():
            t_torch = benchlib.timeit(lambda: ref.extract_speech_token(model, fe, clips), reps=args.reps, warmup=0)
        audio = b * n / 16000
        rows.append({"config": args.config, "batch": b, "seconds_each": args.seconds, "ours_s": t_ours,
                     "torch_s": t_torch, "ours_rtf": audio / t_ours, "torch_rtf": audio / t_torch,
                     "speedup": t_torch / t_ours, "codes_agree": agree})
    benchlib.report(f"GLM-4-Voice speech tokenizer on {jax.default_backend()}, float32 (rtf = seconds of audio per "
                    "second; speedup = PyTorch time / ours)", rows,
                    ["config", "batch", "seconds_each", "ours_s", "torch_s", "ours_rtf", "torch_rtf", "speedup",
                     "codes_agree"], args.json)


if __name__ == "__main__":
    main()
