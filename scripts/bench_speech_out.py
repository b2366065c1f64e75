"""Benchmark: speech output (GLM-4-Voice codes -> 22.05 kHz waveform, flow decoder + HiFT) against the PyTorch
reference (tests/torch_ref/glm4voice_decoder.py), same random weights at the released size, same machine, float32.
Reports the real-time factor (seconds of speech per second of compute) for each and the time ratio ours/PyTorch;
PyTorch runs with 1 thread and with its default, and the faster counts.

    python scripts/bench_speech_out.py [--seconds 2 10] [--reps 1] [--json out/bench_speech_out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import benchlib  # noqa: F401  (puts tests/ on the path)
import numpy as np
import torch

from omnidiff_jax.models.flow import mel_frames
from omnidiff_jax.speech_out import SpeechDecoder, decode_speech
from torch_ref import glm4voice_decoder as ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", nargs="+", type=float, default=[2, 10], help="speech durations to decode")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default="out/bench_speech_out.json")
    args = ap.parse_args()
    flow, hift = ref.random_flow(ref.FLOW), ref.random_hift(ref.HIFT)
    with tempfile.TemporaryDirectory() as d:
        ref.save_decoder(d, flow, hift, ref.FLOW, ref.HIFT)
        decoder = SpeechDecoder.load(d)
    default_threads = torch.get_num_threads()
    rows = []
    for seconds in args.seconds:
        n = round(seconds * 12.5)  # 12.5 codes per second
        codes = np.random.RandomState(0).randint(0, 16384, n)
        speech = 256 * int(mel_frames(n)) / 22050
        start = time.perf_counter()
        decode_speech([codes], decoder)  # compiles for this length bucket
        compile_s = time.perf_counter() - start
        t_ours = benchlib.timeit(lambda: decode_speech([codes], decoder), warmup=0, reps=args.reps)
        tok = torch.from_numpy(codes)[None]
        # On a shared machine torch's spinning OpenMP threads can lose badly to one thread: keep its best.
        torch_times = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                torch_times[threads] = benchlib.timeit(lambda: hift(flow.inference(tok)), warmup=1, reps=args.reps)
        torch.set_num_threads(default_threads)
        threads, t_torch = min(torch_times.items(), key=lambda kv: kv[1])
        rows.append({"speech_s": speech, "codes": n, "ours_s": t_ours, "torch_s": t_torch, "torch_threads": threads,
                     "ours_rtf": speech / t_ours, "torch_rtf": speech / t_torch, "ratio": t_ours / t_torch,
                     "first_call_s": compile_s})
    benchlib.report("Speech output, codes -> 22.05 kHz wave, float32 (rtf = seconds of speech per second; "
                    "ratio = ours / PyTorch time, lower is better)", rows,
                    ["speech_s", "codes", "ours_s", "torch_s", "torch_threads", "ours_rtf", "torch_rtf", "ratio",
                     "first_call_s"],
                    args.json)


if __name__ == "__main__":
    main()
