"""`omnidiff generate`: the masked-diffusion sampler from the command line, for the six tasks and plain text.

    omnidiff generate --model CKPT --task t2i --text "a red apple" --image-tokenizer MAGVIT --out outputs
    omnidiff generate --model CKPT --task asr --audio speech.wav
    omnidiff generate --model CKPT --requests batch.jsonl --image-tokenizer M --speech-decoder D --out outputs
    omnidiff generate --model CKPT --prompt "Tell me a story." [--prompt ...] [--gen-length 128 --steps 128 ...]
    omnidiff generate --config tiny --prompt-ids 1,2,3        (random weights: a smoke test, the output is noise)

Tasks (t2i, s2i, vqa, svqa, tts, asr) run through `omnidiff_jax.pipeline.Pipeline` with the reference's per-task
settings; any sampler flag given overrides them. A `--requests` JSONL file holds one request per line
(`{"task": ..., "text": ..., "image": ..., "audio": ..., "id": ...}` plus optional overrides), tasks mixed
freely; a failing request is reported in the manifest and the others still run. Images are written as PNG,
speech as 22.05 kHz WAV, and every result (text, codes, files, warnings, errors) as a line of
`--out`/manifest.jsonl; the exit status is 1 when any request failed.

The plain-text mode (`--task text`, the default with --prompt/--prompt-ids):
Text prompts are wrapped in the reference chat template (a user turn, then the assistant header; `--raw` to
send the text as is) and tokenized with the checkpoint's tokenizer files through transformers. One JSON line
per prompt goes to stdout (or `--output FILE`): prompt ids, generated ids, and the generated text when a
tokenizer is available (speech and image codes are counted, not decoded). `TASKS` maps `--task` names to how
prompts are built and outputs rendered, so other tasks can be added beside `text`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from omnidiff_jax import distributed
from omnidiff_jax.files import write_text
from omnidiff_jax.sampler import ALGS, Prompt, sample


@dataclasses.dataclass(frozen=True)
class Task:
    """How `generate --task NAME` turns the arguments into prompts and each generation into a JSON record."""

    prompts: Callable[[argparse.Namespace, object, object], list[Prompt]]  # (args, model, tokenizer)
    render: Callable[[Prompt, np.ndarray, object, object], dict]  # (prompt, generated ids, model, tokenizer)


def chat_ids(text: str, tokenizer, layout) -> list[int]:
    """`<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n` (the reference template, no system turn);
    the special tokens by id, the text pieces through the tokenizer."""
    encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    return ([layout.im_start] + encode(f"user\n{text}") + [layout.im_end] + encode("\n") + [layout.im_start]
            + encode("assistant\n"))


def parse_ids(text: str) -> Prompt:
    try:
        return Prompt(np.asarray([int(t) for t in text.split(",")], np.int32))
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers such as 1,2,3") from None


def text_prompts(args, model, tokenizer) -> list[Prompt]:
    prompts = [parse_ids(ids) for ids in args.prompt_ids or []]
    if args.prompt:
        if tokenizer is None:
            where = f"in {args.model}" if args.model else f"with --config {args.config}"
            raise ValueError(f"no tokenizer files {where}: give token ids with --prompt-ids 1,2,3 instead of --prompt")
        for text in args.prompt:
            ids = tokenizer.encode(text, add_special_tokens=False) if args.raw else chat_ids(text, tokenizer,
                                                                                              model.layout)
            prompts.append(Prompt(np.asarray(ids, np.int32)))
    return prompts


def render_text(prompt: Prompt, ids: np.ndarray, model, tokenizer) -> dict:
    layout = model.layout
    codes = layout.is_audio_code(ids) | layout.is_image_code(ids)
    record = {"prompt_ids": prompt.ids.tolist(), "ids": ids.tolist(),
              "speech_codes": int(layout.is_audio_code(ids).sum()), "image_codes": int(layout.is_image_code(ids).sum())}
    if tokenizer is not None:  # as the reference: every non-code id, special tokens skipped
        record["text"] = tokenizer.decode(ids[~codes].tolist(), skip_special_tokens=True)
    return record


TASKS = {"text": Task(text_prompts, render_text)}
MULTIMODAL = ("t2i", "s2i", "vqa", "svqa", "tts", "asr")


def register(group) -> None:
    p = group("").add_parser("generate", help="generate with the masked-diffusion sampler",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder (reference Hugging Face layout)")
    source.add_argument("--config", help="built-in config name or config file: RANDOM weights (smoke tests)")
    p.add_argument("--task", choices=sorted(TASKS) + list(MULTIMODAL), default="text",
                   help="a multimodal task, or 'text' for plain prompts (default)")
    p.add_argument("--text", help="text input (t2i prompt, vqa question, tts text)")
    p.add_argument("--image", help="image input (vqa, svqa)")
    p.add_argument("--audio", help="speech input (asr, s2i, svqa)")
    p.add_argument("--requests", help="JSONL batch file, one request per line (tasks may be mixed)")
    p.add_argument("--image-tokenizer", help="MAGVIT-v2 checkpoint (image inputs and outputs)")
    p.add_argument("--speech-decoder", help="GLM-4-Voice decoder folder (speech outputs to WAV)")
    p.add_argument("--out", default="outputs", help="output folder for multimodal tasks (default ./outputs)")
    p.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--raw", action="store_true", help="tokenize --prompt as is, without the chat template")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter/compute dtype (default: checkpoint's)")
    p.add_argument("--gen-length", type=int, help="tokens to generate per prompt (default: the task's; text 128)")
    p.add_argument("--steps", type=int, help="diffusion steps (default: the task's; text 128)")
    p.add_argument("--alg", choices=ALGS)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float, help="nucleus filter, applied even at temperature 0 (1 = off)")
    p.add_argument("--top-k", type=int, help="top-k filter (0 = off; the reference's config leaves 50)")
    p.add_argument("--alg-temp", type=float)
    p.add_argument("--block-size", type=int, help="semi-autoregressive block size (-1 = one block)")
    p.add_argument("--repeat-penalty", type=float, help="used by --alg entropy-penalty")
    p.add_argument("--max-position-penalty", type=float)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (s2i uses 2.0)")
    p.add_argument("--cfg-compat", action="store_true", default=None,
                   help="reproduce the reference's position-misaligned CFG row exactly")
    p.add_argument("--boa-prefill", action="store_true", default=None,
                   help="pre-fill <|begin_of_audio|> at floor(0.2 N)")
    p.add_argument("--adaptive", choices=("asr", "tts"), help="the evaluation scripts' adaptive length rule")
    p.add_argument("--prefix-cache", action="store_true", default=None,
                   help="reuse the prompt's keys/values within a block")
    p.add_argument("--batch-size", type=int, default=8, help="requests per sampler call (default 8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="text mode: write the JSON lines to this file instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite --output / write into a non-empty --out")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import omnidiff_jax

    distributed.initialize_from_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output and Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if args.model:
        model = omnidiff_jax.load_model(args.model, dtype=args.dtype)
    else:
        overrides = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
        model = omnidiff_jax.init_model(args.config, **overrides)
        print(f"omnidiff: no --model given: using RANDOM weights from init_model({args.config!r}); the output is "
              "noise", file=sys.stderr)
    if args.task in MULTIMODAL or args.requests:
        return run_tasks(args, model)
    tokenizer = None
    if model.tokenizer_path:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    task = TASKS[args.task]
    prompts = task.prompts(args, model, tokenizer)
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    options = dict(gen_length=pick(args.gen_length, 128), steps=pick(args.steps, 128), alg=pick(args.alg, "entropy"),
                   temperature=pick(args.temperature, 0.0), top_p=pick(args.top_p, 0.9),
                   top_k=pick(args.top_k, 50) or None, alg_temp=pick(args.alg_temp, 0.0),
                   block_size=pick(args.block_size, -1), repeat_penalty=pick(args.repeat_penalty, 1.0),
                   max_position_penalty=pick(args.max_position_penalty, 1.0), boa_prefill=bool(args.boa_prefill),
                   prefix_cache=bool(args.prefix_cache), seed=pick(args.seed, 0))
    lines = []
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", file=sys.stderr, disable=len(batches) == 1):
        batch = prompts[start:start + args.batch_size]
        for prompt, ids in zip(batch, sample(model, batch, **options)):
            lines.append(json.dumps(task.render(prompt, ids, model, tokenizer), ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------------------------------- the six tasks

OVERRIDES = (  # CLI flag -> request field; given flags override the task presets
    ("gen_length", "gen_length"), ("steps", "steps"), ("alg", "alg"), ("temperature", "temperature"),
    ("top_p", "top_p"), ("top_k", "top_k"), ("alg_temp", "alg_temp"), ("block_size", "block_size"),
    ("repeat_penalty", "repeat_penalty"), ("max_position_penalty", "max_position_penalty"), ("cfg", "cfg"),
    ("cfg_compat", "cfg_compat"), ("boa_prefill", "boa_prefill"), ("prefix_cache", "prefix_cache"),
    ("seed", "seed"), ("adaptive", "adaptive"),
)


def task_requests(args) -> list[dict]:
    """The requests of a multimodal run: one from --text/--image/--audio, or every line of --requests."""
    from omnidiff_jax.pipeline import iter_jsonl

    if args.requests:
        requests = list(iter_jsonl(args.requests))
        if args.task != "text":
            requests = [{"task": args.task, **r} for r in requests]
    else:
        requests = [{"task": args.task, **{k: getattr(args, k) for k in ("text", "image", "audio")
                                            if getattr(args, k) is not None}}]
    given = {field: getattr(args, flag) for flag, field in OVERRIDES if getattr(args, flag) is not None}
    if given.get("top_k") == 0:
        given["top_k"] = None
    return [{**given, **r} for r in requests]


def run_tasks(args, model) -> int:
    """Runs the requests through `Pipeline`; writes PNG/WAV files and a JSONL manifest into --out."""
    from omnidiff_jax.audio_io import write_wav
    from omnidiff_jax.image import write_png
    from omnidiff_jax.pipeline import Pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to write into it")
    requests = task_requests(args)
    pipe = Pipeline.load(model, image_tokenizer=args.image_tokenizer, speech_decoder=args.speech_decoder,
                         batch_size=args.batch_size)
    with tqdm(total=len(requests), desc="generate", unit="req", file=sys.stderr) as bar:
        results = pipe.run(requests, progress=bar.update)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (request, result) in enumerate(zip(requests, results)):
        stem = _safe_stem(request.get("id"), n)
        record = {k: v for k, v in result.items() if k not in ("image", "wav")}
        record.update(image=None, wav=None)
        if result["image"] is not None:
            write_png(out / f"{stem}.png", result["image"], overwrite=True)
            record["image"] = f"{stem}.png"
        if result["wav"] is not None:
            write_wav(out / f"{stem}.wav", result["wav"], result["sample_rate"])
            record["wav"] = f"{stem}.wav"
        lines.append(json.dumps(record, ensure_ascii=False))
        label = record["error"] or record["image"] or record["wav"] or repr(record["text"][:60])
        print(f"[{stem}] {record['task']}: {label}", file=sys.stderr)
    manifest = out / "manifest.jsonl"
    write_text(manifest, "".join(line + "\n" for line in lines))
    failed = sum(r["error"] is not None for r in results)
    print(f"{len(results) - failed} of {len(results)} requests done; manifest: {manifest}", file=sys.stderr)
    return 1 if failed else 0


def _safe_stem(request_id, n: int) -> str:
    text = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(request_id)) if request_id else ""
    return f"{n:04d}" + (f"-{text[:40]}" if text else "")
