"""`vla demo`: the out-of-the-box job. Runs the checkpoint shipped in policies/checkpoints/default
closed-loop in sim on held-out seeds (success table + video); `--policy expert` shows the scripted
experts on every task instead."""
from __future__ import annotations

import argparse

from policies import CHECKPOINT_DIR
from vla.apps.rollout import (
    EVAL_SEED_OFFSET,
    add_episode_arguments,
    episode_settings,
    parse_tasks,
    report,
    run_policy,
)
from vla.model.checkpoint import trained_tasks

DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", default=str(DEFAULT_CHECKPOINT), help="a checkpoint directory, 'expert' or 'random'"
    )
    parser.add_argument("--task", default=None, help="tasks to run (default: the checkpoint's tasks, or all)")
    parser.add_argument("--episodes", type=int, default=10, help="per task")
    parser.add_argument("--video", default="outputs/demo.mp4")
    parser.add_argument("--video-episodes", type=int, default=2)
    parser.add_argument("--report", default="outputs/demo.json")
    add_episode_arguments(parser)


def run(args) -> int:
    settings = episode_settings(args)
    if args.task:
        tasks = parse_tasks(args.task)
    else:
        tasks = parse_tasks("all") if args.policy in ("expert", "random") else trained_tasks(args.policy)
    results = run_policy(args.policy, tasks, args.episodes, EVAL_SEED_OFFSET, args.video, args.video_episodes,
                         instruction=args.instruction, threads=args.threads, **settings)
    report(results, f"{args.policy} policy", args.report)
    print(f"video: {args.video}")
    return 0
