"""`omnidiff generate`: the masked-diffusion sampler from the command line, for plain-text prompts.

    omnidiff generate --model CKPT --prompt "Tell me a story." [--prompt ...] [--gen-length 128 --steps 128 ...]
    omnidiff generate --config tiny --prompt-ids 1,2,3        (random weights: a smoke test, the output is noise)

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
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

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


def register(group) -> None:
    p = group("").add_parser("generate", help="generate with the masked-diffusion sampler",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder (reference Hugging Face layout)")
    source.add_argument("--config", help="built-in config name or config file: RANDOM weights (smoke tests)")
    p.add_argument("--task", choices=sorted(TASKS), default="text")
    p.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--raw", action="store_true", help="tokenize --prompt as is, without the chat template")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter/compute dtype (default: checkpoint's)")
    p.add_argument("--gen-length", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--steps", type=int, default=128, help="diffusion steps (default 128; at most gen-length run)")
    p.add_argument("--alg", choices=ALGS, default="entropy")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus filter, applied even at temperature 0 (1 = off)")
    p.add_argument("--top-k", type=int, default=50, help="top-k filter (0 = off)")
    p.add_argument("--alg-temp", type=float, default=0.0)
    p.add_argument("--block-size", type=int, default=-1, help="semi-autoregressive block size (-1 = one block)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="used by --alg entropy-penalty")
    p.add_argument("--max-position-penalty", type=float, default=1.0)
    p.add_argument("--boa-prefill", action="store_true", help="pre-fill <|begin_of_audio|> at floor(0.2 N)")
    p.add_argument("--prefix-cache", action="store_true", help="reuse the prompt's keys/values within a block")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON lines to this file instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import omnidiff_jax

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
    tokenizer = None
    if model.tokenizer_path:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer_path)
    task = TASKS[args.task]
    prompts = task.prompts(args, model, tokenizer)
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    options = dict(gen_length=args.gen_length, steps=args.steps, alg=args.alg, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k or None, alg_temp=args.alg_temp, block_size=args.block_size,
                   repeat_penalty=args.repeat_penalty, max_position_penalty=args.max_position_penalty,
                   boa_prefill=args.boa_prefill, prefix_cache=args.prefix_cache, seed=args.seed)
    lines = []
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", file=sys.stderr, disable=len(batches) == 1):
        batch = prompts[start:start + args.batch_size]
        for prompt, ids in zip(batch, sample(model, batch, **options)):
            lines.append(json.dumps(task.render(prompt, ids, model, tokenizer), ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    else:
        sys.stdout.write(text)
    return 0
