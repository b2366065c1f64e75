"""Benchmark: what the sampler's fast modes cost in quality, on the trained `omnidiff demo` model.

Trains the demo once (`omnidiff_jax.demo.run`, kept in --workdir so a rerun skips it), then samples the demo's own
evaluation (every task for every concept, `demo.eval_requests`) with each mode `sampler.sample` offers and scores
it with the demo's exact match (`demo.score`). Per task it prints, for each mode: accuracy, model evaluations per
request and their ratio to the exact sampler's, and the share of generated tokens equal to the exact sampler's.

Model evaluations are counted from the sampler's history: the steps each request ran (`return_history`), one model
pass each. A cached pass runs the model over a window of the canvas (prefix cache: the generation region; dual
cache: one block) against the cached keys and values, and a step that starts a block is a full pass.
The goal checked at the end (issue 19): a setting with at most a third of the exact sampler's evaluations on every
task and every task's accuracy within 0.05 of the exact sampler's. Writes JSON.

    python scripts/bench_quality.py [--workdir out/bench_quality] [--train-steps 1500] [--block-size 8]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import benchlib
import numpy as np

from omnidiff_jax import demo
from omnidiff_jax.files import write_text
from omnidiff_jax.request import check_request
from omnidiff_jax.sampler import sample
from omnidiff_jax.tasks import split_output

TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)
GOAL_EVALS, GOAL_ACCURACY = 1 / 3, 0.05


def modes(block_size: int) -> list[tuple[str, dict, float]]:
    """(name, `sample` options, fraction of the exact step count) of every mode measured; the demo samples one
    block of gen_length tokens in gen_length steps, and the block rows use `block_size` instead."""
    blocks = {"block_size": block_size}
    return ([("exact", {}, 1.0)]
            + [(f"tau {tau}", {"threshold": tau}, 1.0) for tau in TAUS]
            + [("prefix cache", {"prefix_cache": True}, 1.0), ("dual cache", {"dual_cache": True}, 1.0)]
            + [(f"cosine, 1/{d} steps", {"mask_schedule": "cosine"}, 1 / d) for d in (2, 4, 8)]
            + [(f"linear, 1/{d} steps", {}, 1 / d) for d in (2, 4, 8)]
            + [(f"exact, block {block_size}", blocks, 1.0),
               (f"prefix cache, block {block_size}", {**blocks, "prefix_cache": True}, 1.0),
               (f"dual cache, block {block_size}", {**blocks, "dual_cache": True}, 1.0),
               (f"tau 0.9, block {block_size}", {**blocks, "threshold": 0.9}, 1.0),
               (f"tau 0.9 + dual cache, block {block_size}", {**blocks, "threshold": 0.9, "dual_cache": True}, 1.0)])


def available(options: dict) -> bool:
    """Whether `sample` takes every option (the fast modes land one by one)."""
    return set(options) <= set(inspect.signature(sample).parameters)


def trained(workdir: Path, steps: int, seed: int) -> dict:
    """The demo run in workdir/demo (trained now if it is not there); returns its results.json summary."""
    root = workdir / "demo"
    if (root / "results.json").exists() and json.loads((root / "results.json").read_text())["train_steps"] == steps:
        print(f"reusing the demo model trained in {root}")
    else:
        print(f"training the demo model ({steps} steps) in {root}", flush=True)
        demo.run(root, steps=steps, seed=seed, progress=False)
    return json.loads((root / "results.json").read_text())


def run_mode(pipe, requests: list[dict], prompts: list, options: dict, fraction: float, seed: int):
    """Samples every request with `options` at `fraction` of its steps, one batch per group of equal settings;
    returns (result dicts with the pipeline's text / audio_codes / image_codes fields, ids, model evaluations)."""
    layout, n = pipe.model.layout, len(requests)
    results, ids, evals = [None] * n, [None] * n, [0] * n
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        p = check_request(r, i).preset  # the task's preset with the request's overrides, as the pipeline runs it
        settings = dict(alg=p.alg, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, cfg_scale=p.cfg_scale,
                        repeat_penalty=p.repeat_penalty, max_position_penalty=p.max_position_penalty,
                        boa_prefill=p.boa_prefill)
        groups.setdefault(tuple(sorted(settings.items())), []).append(i)
    for key, rows in groups.items():
        out, history = sample(pipe.model, [prompts[i] for i in rows], seed=seed, return_history=True,
                              gen_length=[requests[i]["gen_length"] for i in rows],
                              steps=[max(1, int(requests[i]["steps"] * fraction)) for i in rows],
                              **dict(key), **options)
        for i, x, h in zip(rows, out, history):
            parsed = split_output(x, layout)
            ids[i], evals[i] = x, len(h)
            results[i] = {"text": pipe.tokenizer.decode(parsed.text_ids), "audio_codes": parsed.audio_codes,
                          "image_codes": parsed.image_codes}
    return results, ids, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="out/bench_quality", help="the trained demo run is kept here")
    ap.add_argument("--train-steps", type=int, default=1500,
                    help="training steps (default 1500, the steps of the README table; the demo's default is 1100)")
    ap.add_argument("--block-size", type=int, default=8, help="block size of the block rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="out/bench_quality.json")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    summary = trained(workdir, args.train_steps, args.seed)
    pipe = demo.trained_pipeline(workdir / "demo", args.seed)
    layout = pipe.model.layout
    concepts = demo.world(layout.num_image_codes, layout.num_audio_codes)
    requests, targets = demo.eval_requests(concepts, workdir / "demo" / "media", np.random.RandomState(args.seed + 1))
    prompts = [pipe.prompt(r) for r in requests]
    tasks = list(demo.TASK_LENGTHS)
    pipeline_ids = [r["ids"] for r in pipe.run(requests)]  # the demo's own path, to check this script's batches

    rows, missing, exact_ids = [], [], None
    for name, options, fraction in modes(args.block_size):
        if not available(options):
            missing.append(name)
            print(f"{name}: not available (sample() lacks one of {sorted(options)})")
            continue
        start = time.perf_counter()
        results, ids, evals = run_mode(pipe, requests, prompts, options, fraction, args.seed)
        seconds = time.perf_counter() - start
        accuracy = demo.score(requests, results, targets)
        if exact_ids is None:  # the first mode is the exact sampler
            exact_ids = ids
            same = all(list(a) == list(b) for a, b in zip(ids, pipeline_ids))
            print(f"exact: tokens {'identical to' if same else 'DIFFER from'} the pipeline's; accuracy "
                  f"{accuracy} (demo run: {summary['accuracy']})")
        for task in tasks:
            mine = [i for i, r in enumerate(requests) if r["task"] == task]
            rows.append({"task": task, "mode": name, "options": options, "steps_fraction": fraction,
                         "accuracy": accuracy[task], "evals_per_request": float(np.mean([evals[i] for i in mine])),
                         "agree_with_exact": float(np.mean([(ids[i] == exact_ids[i]).mean() for i in mine])),
                         "seconds_all_tasks": seconds})
        print(time.strftime("%H:%M:%S"), name, accuracy, flush=True)

    exact = {r["task"]: r for r in rows if r["mode"] == "exact"}
    for r in rows:
        r["evals_vs_exact"] = r["evals_per_request"] / exact[r["task"]]["evals_per_request"]
        r["accuracy_vs_exact"] = r["accuracy"] - exact[r["task"]]["accuracy"]
    columns = ["mode", "accuracy", "accuracy_vs_exact", "evals_per_request", "evals_vs_exact", "agree_with_exact"]
    for task in tasks:
        benchlib.report(f"demo task {task}: exact match against model evaluations per request",
                        [r for r in rows if r["task"] == task], columns, None)
    names = dict.fromkeys(r["mode"] for r in rows)
    summary_rows = [{"mode": m, **{r["task"]: r["accuracy"] for r in rows if r["mode"] == m},
                     "evals_vs_exact (max)": max(r["evals_vs_exact"] for r in rows if r["mode"] == m),
                     "agree_with_exact (min)": min(r["agree_with_exact"] for r in rows if r["mode"] == m)}
                    for m in names]
    benchlib.report("all tasks: exact match per task, the largest evaluation ratio and the lowest agreement",
                    summary_rows, ["mode", *tasks, "evals_vs_exact (max)", "agree_with_exact (min)"], None)
    goal = [m for m in names if all(r["evals_vs_exact"] <= GOAL_EVALS + 1e-9
                                    and r["accuracy_vs_exact"] >= -GOAL_ACCURACY for r in rows if r["mode"] == m)]
    print(f"\nsettings with <= 1/3 of the exact evaluations and no task more than {GOAL_ACCURACY} below exact: "
          f"{goal or 'none'}")
    if missing:
        print(f"not available in this sampler: {missing}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps({"benchmark": "sampler modes on the trained demo model", "machine": benchlib.machine(),
                                "train_steps": summary["train_steps"], "block_size": args.block_size,
                                "meets_goal": goal, "not_available": missing, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
