"""`vla demo`: the out-of-the-box job. Runs the checkpoint shipped in policies/checkpoints/default
closed-loop in sim on held-out seeds (success table + video); `--policy expert` shows the scripted
experts on every task instead."""
from __future__ import annotations

import argparse

from policies import CHECKPOINT_DIR
from vla import rollout

DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default=str(DEFAULT_CHECKPOINT), help="a checkpoint directory, 'expert' or 'random'")
    parser.add_argument("--task", default=None, help="tasks to run (default: the checkpoint's tasks, or all)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--video", default="outputs/demo.mp4")
    parser.add_argument("--video-episodes", type=int, default=2)
    parser.add_argument("--report", default="outputs/demo.json")


def run(args) -> int:
    tasks = args.task or "all"
    if args.policy not in ("expert", "random") and args.task is None:
        from vla.model.checkpoint import trained_tasks

        tasks = ",".join(trained_tasks(args.policy))
    args = argparse.Namespace(**{**vars(args), "task": tasks, "seed": rollout.EVAL_SEED_OFFSET, "image_size": 96, "gui": False})
    return rollout.run(args)
