"""`omnidiff generate`: the masked-diffusion sampler from the command line, for every task and plain text.

    omnidiff generate --model CKPT --task t2i --text "a red apple" --image-tokenizer MAGVIT --out outputs
    omnidiff generate --model CKPT --task asr --audio speech.wav
    omnidiff generate --model CKPT --requests batch.jsonl --image-tokenizer M --speech-decoder D --out outputs
    omnidiff generate --model CKPT --prompt "Tell me a story." [--prompt ...] [--gen-length 128 --steps 128 ...]
    omnidiff generate --config tiny --prompt-ids 1,2,3        (random weights: a smoke test, the output is noise)

Every run goes through `omnidiff_jax.pipeline.Pipeline` with the task's preset (`omnidiff_jax.tasks`); any
sampler flag given overrides it. A `--requests` JSONL file holds one request per line (`{"task": ..., "text":
..., "image": ..., "audio": ..., "id": ...}` plus optional overrides; see `omnidiff_jax.request`), tasks mixed
freely. There the flags (`--task`, the sampler flags, `--raw`) are every request's defaults and a request's own
fields override them: the more specific setting wins, so a line with `"steps": 64` runs 64 steps whatever
`--steps` says, and the lines without `steps` run `--steps`. Each request is checked on its own, and one that
fails is reported with its error while the others still run.

Results are written as each request finishes (`omnidiff_jax.outputs`): images as PNG and speech as 22.05 kHz
WAV into `--out`, and every result (text, codes, files, warnings, errors) as a line of `--out`/manifest.jsonl.
Plain text (`--prompt`, `--prompt-ids`, or `--task text --text`) is the `text` task: the prompt in the reference
chat template (`--raw`: as is), one JSON line per prompt on stdout (or `--output FILE`). The exit status is 1
when any request failed.
"""

from __future__ import annotations

import argparse
import sys

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from omnidiff_jax import distributed
from omnidiff_jax.checkpoint import load_model
from omnidiff_jax.model import init_model
from omnidiff_jax.outputs import ResultWriter
from omnidiff_jax.pipeline import Pipeline
from omnidiff_jax.request import INPUT_FIELDS, iter_jsonl
from omnidiff_jax.sampler import ALGS, MASK_SCHEDULES
from omnidiff_jax.sharding import make_mesh
from omnidiff_jax.tasks import TASKS

SAMPLER_FLAGS = ("gen_length", "steps", "alg", "temperature", "top_p", "top_k", "alg_temp", "block_size",
                 "repeat_penalty", "max_position_penalty", "cfg_scale", "cfg_compat", "boa_prefill", "prefix_cache",
                 "dual_cache", "threshold", "mask_schedule", "seed", "adaptive")  # request fields with a flag


def register(group) -> None:
    p = group("").add_parser("generate", help="generate with the masked-diffusion sampler",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder (reference Hugging Face layout)")
    source.add_argument("--config", help="built-in config name or config file: RANDOM weights (smoke tests)")
    p.add_argument("--task", choices=TASKS, help="the task ('text' with --prompt / --prompt-ids)")
    p.add_argument("--text", help="text input (t2i prompt, vqa question, tts text, text prompt)")
    p.add_argument("--image", help="image input (vqa, svqa)")
    p.add_argument("--audio", help="speech input (asr, s2i, svqa)")
    p.add_argument("--requests", help="JSONL batch file, one request per line (tasks may be mixed); the flags are "
                   "every request's defaults, a request's own fields override them")
    p.add_argument("--image-tokenizer", help="MAGVIT-v2 checkpoint (image inputs and outputs)")
    p.add_argument("--speech-decoder", help="GLM-4-Voice decoder folder (speech outputs to WAV)")
    p.add_argument("--out", default="outputs", help="output folder, except for plain text (default ./outputs)")
    p.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--raw", action="store_true", help="tokenize the text as is, without the chat template")
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
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (s2i uses 2.0; 0 = off)")
    p.add_argument("--cfg-compat", action="store_true", default=None,
                   help="reproduce the reference's position-misaligned CFG row exactly")
    p.add_argument("--boa-prefill", action="store_true", default=None,
                   help="pre-fill <|begin_of_audio|> at floor(0.2 N)")
    p.add_argument("--adaptive", choices=("asr", "tts"), help="the evaluation scripts' adaptive length rule")
    p.add_argument("--prefix-cache", action="store_true", default=None,
                   help="reuse the prompt's keys/values within a block (approximate)")
    p.add_argument("--dual-cache", action="store_true", default=None,
                   help="reuse the keys/values outside the current block within a block (approximate)")
    p.add_argument("--threshold", type=float,
                   help="commit every mask of the block whose token probability exceeds this, at least one per step "
                   "(Fast-dLLM; approximate, --steps unused)")
    p.add_argument("--mask-schedule", choices=MASK_SCHEDULES, help="linear (the reference's) or cosine (MaskGIT)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per sampler call (default 8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="plain text: write the JSON lines to this file instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite --output / write into a non-empty --out")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="run over a device mesh, e.g. 2,4,1; one size may be -1, the remaining devices (write "
                   "--mesh=-1,1,4 then): requests split over data, the model over fsdp and tensor (default: one "
                   "device; all devices on data with --distributed)")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    distributed.initialize_from_args(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    requests = requests_from_args(args)
    mesh = parse_mesh(args.mesh or ("-1,1,1" if jax.process_count() > 1 else None))
    if jax.process_index() > 0:  # every process samples, process 0 writes
        writer = ResultWriter.discard()
    elif args.requests or requests[0]["task"] != "text":
        writer = ResultWriter.folder(args.out, args.force)
    else:
        writer = ResultWriter.lines_to(args.output, args.force)
    with writer:
        if args.model:
            model = load_model(args.model, dtype=args.dtype, mesh=mesh)
        else:
            overrides = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
            model = init_model(args.config, mesh=mesh, **overrides)
            print(f"omnidiff: no --model given: using RANDOM weights from init_model({args.config!r}); the output "
                  "is noise", file=sys.stderr)
        pipe = Pipeline.load(model, image_tokenizer=args.image_tokenizer, speech_decoder=args.speech_decoder,
                             mesh=mesh, batch_size=args.batch_size)
        with tqdm(total=len(requests), desc="generate", unit="req", file=sys.stderr,
                  disable=len(requests) == 1) as bar:
            for index, result in pipe.stream(requests):
                record = writer.write(index, result)
                label = record["error"] or record["image"] or record["wav"] or repr((record["text"] or "")[:60])
                bar.write(f"[{index}] {record['task']}: {label}", file=sys.stderr)
                bar.update()
    where = f"; manifest: {writer.path}" if writer.media is not None else ""
    print(f"{len(requests) - writer.failed} of {len(requests)} requests done{where}", file=sys.stderr)
    return 1 if writer.failed else 0


def requests_from_args(args) -> list[dict]:
    """The run's requests: every line of --requests, the --prompt / --prompt-ids prompts, or one request of --task
    from --text / --image / --audio. The sampler flags given (and --raw) are every request's defaults, over the
    task's preset, and a request's own fields override them (--task, likewise, fills in only the lines without
    one)."""
    inputs = {k: getattr(args, k) for k in INPUT_FIELDS if getattr(args, k) is not None}
    prompts = (args.prompt or []) + (args.prompt_ids or [])
    if args.requests and (prompts or inputs):
        raise ValueError("--requests holds the requests: give no --prompt, --prompt-ids, --text, --image, --audio")
    if args.requests:
        requests = [{"task": args.task, **r} if args.task else r for r in iter_jsonl(args.requests)]
        if not requests:
            raise ValueError(f"{args.requests}: no requests in the file")
    elif prompts:
        if args.task not in (None, "text") or inputs:
            raise ValueError("--prompt / --prompt-ids are plain text prompts (task text): give no --task other than "
                             "text, and no --text, --image or --audio")
        requests = ([{"task": "text", "prompt_ids": parse_ids(ids)} for ids in args.prompt_ids or []]
                    + [{"task": "text", "text": text} for text in args.prompt or []])
    elif args.task:
        requests = [{"task": args.task, **inputs}]
    else:
        raise ValueError("nothing to generate: give --task with its inputs, --prompt / --prompt-ids, or --requests")
    given = {field: getattr(args, field) for field in SAMPLER_FLAGS if getattr(args, field) is not None}
    if given.get("top_k") == 0:
        given["top_k"] = None
    if args.raw:
        given["chat"] = False
    return [{**given, **r} for r in requests]  # a request's own fields win


def parse_mesh(text: str | None) -> Mesh | None:
    """'2,4,1' -> a (data, fsdp, tensor) mesh over every device of every process; None -> None."""
    if text is None:
        return None
    try:
        data, fsdp, tensor = (int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected three sizes DATA,FSDP,TENSOR such as 2,4,1") from None
    return make_mesh(data, fsdp, tensor)


def parse_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers such as 1,2,3") from None
