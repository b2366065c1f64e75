"""`omnidiff demo`: train a tiny any-to-any model on a synthetic world and sample all six tasks (CPU, minutes)."""

from __future__ import annotations


def register(group) -> None:
    p = group("").add_parser("demo", help="train a tiny model on a built-in synthetic dataset and sample every task",
                             description=__doc__)
    p.add_argument("--out", default="demo", help="output folder (default: ./demo; replaced if it is a demo folder)")
    p.add_argument("--steps", type=int, default=1100, help="training steps (default 1100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier demo folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnidiff_jax import demo

    summary = demo.run(args.out, steps=args.steps, seed=args.seed, force=args.force)
    chance = summary["chance"]
    print(f"\nper-task exact match after {summary['train_steps']} steps ({summary['seconds']} s; chance {chance:.2f}):")
    for task, acc in summary["accuracy"].items():
        print(f"  {task:5s} {acc:6.2f}  {'#' * round(20 * acc)}")
    print(f"target | t2i | s2i grids: {summary['picture']}")
    return 0
