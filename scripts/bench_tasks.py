"""Benchmark: requests per second of each task (t2i, s2i, vqa, svqa, tts, asr) through `Pipeline`, batch 1 and 8,
float32 on this machine. Prints a table and writes JSON.

The model is a converted random checkpoint of config `small` (~110M-parameter Dream, 8192 image codes so that
MAGVIT's codes fit) with the tiny SenseVoice encoder and projector as its speech front end, built as
tests/test_pipeline.py builds its tiny one; images go through a tiny random MAGVIT-v2 (same x16 code grid) and
speech outputs stay codes (no waveform decoder). So the numbers are the LLM's sampling plus prompt building;
the full-size MAGVIT, SenseVoice and speech decoder have their own benchmarks (bench_images, bench_speech_in,
bench_speech_out). Text is UTF-8 bytes (a random checkpoint has no tokenizer files), so text prompts are a few
times longer than with the released BPE. Inputs are the real files in tests/data (a 512-pixel user image is
1024 codes).

By default every task runs its preset from omnidiff_jax/tasks.py: t2i and s2i 260 steps for 260 tokens (s2i with
CFG, so two model rows per request), svqa 128/128, vqa 64/64, tts and asr 25 steps for 50 tokens. On two CPU
cores that is about three hours (0.2-20 s per step); `--steps N` runs every task with N steps (same generation
lengths and programs), and `ms_per_step` (which includes each batch's prompt encoding) scales the result to other
step counts. Each batch is timed once, after a one-step run that compiles its program.

    python scripts/bench_tasks.py [--steps 4] [--batches 1 8] [--tasks t2i vqa ...] [--json out/bench_tasks.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib

from omnidiff_jax.checkpoint import load_model
from omnidiff_jax.configs.base import model_config
from omnidiff_jax.configs.small import get_config as small
from omnidiff_jax.image import ImageTokenizer
from omnidiff_jax.pipeline import Pipeline
from omnidiff_jax.tasks import PRESETS
from omnidiff_jax.text_tokenizer import ByteTokenizer
from torch_ref.omni import write_random_omni

REQUESTS = {
    "t2i": {"text": "a red apple on a wooden table"},
    "s2i": {"audio": "s2i_0.wav"},
    "vqa": {"text": "What is in the picture?", "image": "vqa_0.png"},
    "svqa": {"audio": "svqa_0.wav", "image": "svqa_0.jpg"},
    "tts": {"text": "The quick brown fox jumps over the lazy dog."},
    "asr": {"audio": "asr_0.wav"},
}


def build(root: Path) -> Pipeline:
    """A converted random `small` checkpoint with a tiny speech front end, a byte tokenizer and a tiny random
    MAGVIT-v2."""
    base = small()
    shape = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "rope_theta")
    cfg = model_config(**{k: base.model[k] for k in shape}, num_text=base.vocab.num_text,
                       num_audio_codes=base.vocab.num_audio_codes,
                       num_image_codes=8192)  # MAGVIT-v2's LFQ always gives 13-bit codes
    converted, magvit = write_random_omni(root, cfg)
    model = load_model(converted)
    return Pipeline(model, ByteTokenizer(model.layout.num_text), ImageTokenizer.load(magvit))


def request(task: str, steps: int | None, assets: Path) -> dict:
    """The task's benchmark request with its inputs from the `assets` folder (tests/data)."""
    fields = {k: str(assets / v) if k in ("audio", "image") else v for k, v in REQUESTS[task].items()}
    return {"task": task, **fields, **({"steps": steps} if steps else {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps for every task (default: each task's preset)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--tasks", nargs="+", choices=list(REQUESTS), default=list(REQUESTS))
    ap.add_argument("--assets", type=Path, default=benchlib.DATA)
    ap.add_argument("--json", default="out/bench_tasks.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pipe = build(Path(d))
    pipe.batch_size = max(args.batches)
    rows = []
    for task in args.tasks:
        steps = min(args.steps or PRESETS[task].steps, PRESETS[task].gen_length)
        for b in args.batches:
            batch = [request(task, args.steps, args.assets)] * b
            results = pipe.run([{**r, "steps": 1} for r in batch])  # compiles; the program does not depend on steps
            if results[0]["error"]:
                raise RuntimeError(f"{task}: {results[0]['error']}")
            start = time.perf_counter()
            pipe.run(batch)
            seconds = time.perf_counter() - start
            rows.append({"task": task, "batch": b, "gen_length": PRESETS[task].gen_length, "steps": steps,
                         "cfg_scale": PRESETS[task].cfg_scale, "seconds": seconds, "requests_per_s": b / seconds,
                         "ms_per_step": seconds / steps * 1e3})
            print(time.strftime("%H:%M:%S"), rows[-1], flush=True)
    benchlib.report(f"Requests/s per task through Pipeline, config small (random weights), float32, "
                    f"{'preset steps' if args.steps is None else f'{args.steps} steps'}", rows,
                    ["task", "batch", "gen_length", "steps", "cfg_scale", "seconds", "requests_per_s", "ms_per_step"],
                    args.json)


if __name__ == "__main__":
    main()
