"""`omnidiff eval asr|tts|mme|wer|mme-score`: the reference's ASR/TTS word error rates and MME score.

asr, tts and mme load the model through `omnidiff_jax.pipeline.Pipeline` and generate; wer and mme-score only
score files that exist (the reference's compute-wer.py and MME's calculation.py steps).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omnidiff_jax import evaluation as ev

log = logging.getLogger(__name__)


def register(group) -> None:
    sub = group("eval")

    p = sub.add_parser("asr", help="ASR word error rate on a LibriSpeech-format jsonl",
                       description="Transcribes each record's audios[0] with the model's ASR task (adaptive length, "
                                   "as evaluate_asr.py) and scores against messages[1].content as compute-wer.py "
                                   "--char=1.")
    _model_arguments(p)
    p.add_argument("jsonl", help="records with 'messages' and 'audios'")
    _data_arguments(p)
    p.set_defaults(func=run_asr)

    p = sub.add_parser("tts", help="TTS word error rate on a LibriTTS-format jsonl",
                       description="Speaks each record's text (messages[0].content after 'Convert the text to "
                                   "speech.'), writes the wavs, transcribes them and scores the normalised text as "
                                   "evaluate_libritts.py. Records that yield no speech codes are skipped.")
    _model_arguments(p)
    p.add_argument("jsonl", help="records with 'messages' and 'audios' (audios[0] names the output wav)")
    _data_arguments(p)
    p.add_argument("--whisper", metavar="PATH",
                   help="transcribe with this Whisper checkpoint (transformers format; the reference uses "
                        "openai/whisper-large-v3) instead of the model's own ASR task")
    p.set_defaults(func=run_tts)

    p = sub.add_parser("mme", help="MME perception/cognition scores",
                       description="Answers every MME question (8 tokens, 8 steps, as evaluate_imageqa_mme.py), "
                                   "writes <task>.txt results in MME's eval_tool format and scores them.")
    _model_arguments(p)
    p.add_argument("folder", help="MME folder: <task>/questions_answer_pairs + images, <task>/*.txt beside "
                                  "images, or eval_tool/Your_Results/*.txt with images/<task>/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="requests per generate call (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")
    p.set_defaults(func=run_mme)

    p = sub.add_parser("wer", help="score REF and HYP transcript files as compute-wer.py --char=1")
    p.add_argument("ref", help="'{id} {text}' lines")
    p.add_argument("hyp", help="'{id} {text}' lines; only ids present in both files count")
    p.add_argument("--per-utterance", action="store_true", help="also print each utterance's counts")
    p.set_defaults(func=run_wer)

    p = sub.add_parser("mme-score", help="score MME results files (<task>.txt: image, question, gt, pred)")
    p.add_argument("folder", help="folder of <task>.txt results")
    p.set_defaults(func=run_mme_score)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Omni-Diffusion checkpoint folder")
    p.add_argument("--component", action="append", default=[], metavar="NAME=PATH",
                   help="another checkpoint the pipeline loads, passed to Pipeline.load as NAME=PATH "
                        "(repeatable)")


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="", help="folder the records' relative audio paths are joined to")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--name", help="output file stem (default: the jsonl's stem, as the reference)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per generate call (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")


def _pipeline(args):
    from omnidiff_jax.pipeline import Pipeline

    components = {}
    for item in args.component:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--component expects NAME=PATH, got {item!r}")
        components[name] = path
    return Pipeline.load(args.model, **components)


def _run(pipeline, requests: list[dict]) -> list[dict]:
    results = pipeline.run(requests)
    for request, result in zip(requests, results):
        for warning in result.get("warnings", ()):
            log.warning("%s %s: %s", request["task"], request.get("audio") or request.get("image"), warning)
    return results


def _texts(pipeline):
    return lambda requests: [r["text"] for r in _run(pipeline, requests)]


def _samples(args, read):
    samples = read(args.jsonl, args.prefix)
    return samples if args.limit is None else samples[:args.limit]


def _print_wer(report: ev.WerReport, out: str) -> None:
    print(f"{report.total.summary()} over {len(report.utterances)} utterances"
          + (f" ({len(report.skipped)} skipped: no speech codes)" if report.skipped else "") + f"; outputs in {out}")


def run_asr(args) -> int:
    samples = _samples(args, ev.read_asr_jsonl)
    report = ev.run_asr_eval(samples, _texts(_pipeline(args)), args.out, args.name or Path(args.jsonl).stem,
                             args.batch_size, args.overwrite)
    _print_wer(report, args.out)
    return 0


def run_tts(args) -> int:
    samples = _samples(args, ev.read_tts_jsonl)
    pipeline = _pipeline(args)

    def synthesize(requests):
        speech = []
        for request, r in zip(requests, _run(pipeline, requests)):
            if r["audio_codes"] and r["wav"] is None:
                raise ValueError(f"tts {request['text'][:60]!r}: speech codes but no waveform; the pipeline needs "
                                 "the speech decoder component")
            speech.append((r["wav"], r["sample_rate"]) if r["audio_codes"] else None)
        return speech

    if args.whisper:
        transcribe = whisper_transcriber(args.whisper)
    else:
        texts = _texts(pipeline)

        def transcribe(paths):
            return [ev.clean_asr_text(t) for t in texts([ev.asr_request(p) for p in paths])]

    report = ev.run_tts_eval(samples, synthesize, transcribe, args.out, args.name or Path(args.jsonl).stem,
                             args.batch_size, args.overwrite)
    if not report.utterances:
        print(f"no record produced speech codes ({len(report.skipped)} skipped)", file=sys.stderr)
    _print_wer(report, args.out)
    return 0


def whisper_transcriber(path: str):
    """wav paths -> text with a transformers Whisper checkpoint on CPU (long-form, with timestamps, as the
    reference's pipeline call)."""
    from transformers import pipeline as hf_pipeline

    from omnidiff_jax.audio_io import load_audio

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such Whisper checkpoint")
    asr = hf_pipeline("automatic-speech-recognition", model=path, device="cpu")

    def transcribe(paths):
        texts = []
        for p in paths:
            wave, sr = load_audio(p, 16000)
            texts.append(asr({"raw": wave, "sampling_rate": sr}, return_timestamps=True)["text"])
        return texts

    return transcribe


def _print_mme(scores: ev.MMEScores) -> None:
    print(f"{'task':<24}{'acc':>8}{'acc+':>8}{'score':>9}{'other':>7}")
    for task, s in scores.tasks.items():
        print(f"{task:<24}{100 * s.acc:>8.2f}{100 * s.acc_plus:>8.2f}{s.score:>9.2f}{s.other:>7}")
    for group, total in scores.groups.items():
        print(f"{group} total: {total:.2f}")


def run_mme(args) -> int:
    ev.read_mme(args.folder)  # a malformed folder fails before the model loads
    scores = ev.run_mme_eval(args.folder, _texts(_pipeline(args)), args.out, args.batch_size, args.overwrite)
    _print_mme(scores)
    print(f"outputs in {args.out}")
    return 0


def run_wer(args) -> int:
    report = ev.score_files(args.ref, args.hyp)
    if args.per_utterance:
        for utt, counts in report.utterances.items():
            print(f"{utt}: {counts.summary()}")
    print(f"Overall -> {report.total.summary()}")
    return 0


def run_mme_score(args) -> int:
    scores = ev.score_mme(ev.read_mme_results(args.folder))
    _print_mme(scores)
    return 0
