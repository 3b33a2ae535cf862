"""`vla eval --checkpoint DIR [--task T] --episodes N`: closed-loop evaluation on held-out seeds.

`--randomize lighting,shades,jitter` evaluates under domain randomisation (the same scenes per
seed), `--instruction "grab the {colour} {shape}"` with other words than the task's own, and
`--phrasings heldout` with requests put in ways training never saw, or `--phrasings synonyms` with
those and names for colours, shapes and bins it never saw (sim.language): then the same seeds run
with the training phrasings too, and both are reported side by side.

Prints success and language grounding per task (grounding: the first object the gripper reaches
is the instructed one, among distractors of other colours) and the share of episodes that reached
each stage of a multi-stage task (place: touched, lifted, over bin; sim.tasks: where a policy
fails); with held-out phrasings, success per verb phrase ("shift the {obj} {direction}": which
ways of asking fail); writes rollout videos and a JSON report with per-episode results, the
runtime that ran and its mean latency per control step.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from policies.vla_policy import VLAPolicy
from sim import TASKS, SimConfig
from sim.language import verb_of
from vla.apps.rollout import (
    EVAL_SEED_OFFSET,
    add_episode_arguments,
    by_task,
    closed_again_rate,
    episode_settings,
    first_close_shares,
    grasps,
    grounding_rate,
    parse_tasks,
    run_episodes,
    stage_rate,
    stage_table,
    success_rate,
    success_table,
)
from vla.model.checkpoint import trained_tasks
from vla.model.config import EXECUTIONS


class TimedPolicy:
    """Measures the policy's time per act() call: the control-step latency a robot would see; warns
    (once per set of words) about instructions with words the model was not trained on."""

    def __init__(self, policy):
        self.policy, self.seconds, self.warned = policy, [], set()

    def reset(self, instruction: str) -> None:
        self.policy.reset(instruction)
        unknown = self.policy.unknown_words(instruction)
        if unknown and frozenset(unknown) not in self.warned:
            self.warned.add(frozenset(unknown))
            tqdm.write(f"warning: {instruction!r} has words the model was not trained on: {', '.join(unknown)}")

    def act(self, obs: dict) -> np.ndarray:
        start = time.perf_counter()
        action = self.policy.act(obs)
        self.seconds.append(time.perf_counter() - start)
        return action


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--task", default=None, help="comma-separated tasks or 'all' (default: the checkpoint's tasks)")
    parser.add_argument("--episodes", type=int, default=50, help="per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_OFFSET, help="first seed (held out from training)")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decoder", default=None, help="parallel | autoregressive (default: the model's first)")
    parser.add_argument("--execution", choices=EXECUTIONS, help="default: the checkpoint's")
    parser.add_argument("--gripper-open-steps", type=int, default=None,
                        help="a closed gripper opens after this many consecutive steps asking to "
                             "(policies.gripper; 1: at once; default: the checkpoint's)")
    parser.add_argument("--out", default="outputs/eval", help="directory for report.json and rollouts.mp4")
    parser.add_argument("--video-episodes", type=int, default=2, help="episodes per task in the video (0: none)")
    add_episode_arguments(parser)


def run(args) -> int:
    if args.episodes <= 0:
        raise ValueError(f"--episodes must be positive, got {args.episodes}")
    settings = episode_settings(args)
    tasks = parse_tasks(args.task) if args.task else trained_tasks(args.checkpoint)
    policy = TimedPolicy(VLAPolicy.from_checkpoint(args.checkpoint, args.backend, args.device, args.decoder,
                                                   threads=args.threads, execution=args.execution,
                                                   gripper_open_steps=args.gripper_open_steps))
    out = Path(args.out)
    video = out / "rollouts.mp4" if args.video_episodes else None
    # held-out phrasings are compared with the training ones on the same seeds
    phrasings = list(dict.fromkeys(["train", args.phrasings]))
    results = {}
    for phrasing in phrasings:
        sim = SimConfig.for_spec(policy.policy.spec, **(settings | {"phrasing": phrasing}))
        results[phrasing] = run_episodes(tasks, lambda env: policy, args.episodes, args.seed, sim,
                                         video if phrasing == args.phrasings else None, args.video_episodes,
                                         instruction=args.instruction)
        Console().print(success_table(results[phrasing], f"{args.checkpoint} ({policy.policy.runtime.name}), "
                                                         f"{phrasing} phrasings"))
        stages = stage_table(results[phrasing], f"stages reached, {phrasing} phrasings")
        if stages is not None:
            Console().print(stages)
    if len(results) > 1:
        Console().print(phrasing_table(results["train"], results[args.phrasings], args.phrasings))
        Console().print(verb_table(results[args.phrasings], args.phrasings))
    chosen = results[args.phrasings]
    report = {
        "checkpoint": str(args.checkpoint), "runtime": policy.policy.runtime.name, "execution": policy.policy.execution,
        "gripper_open_steps": policy.policy.gripper.open_steps,
        "seeds": [args.seed, args.seed + args.episodes - 1],
        "settings": settings, "instruction": args.instruction, "threads": args.threads,
        "success": {task: success_rate(rows) for task, rows in by_task(chosen).items()},
        "grounding": {task: grounding_rate(rows) for task, rows in by_task(chosen).items()},
        "stages": {task: {stage: stage_rate(rows, stage) for stage in TASKS[task].stages}
                   for task, rows in by_task(chosen).items()},
        "first_close": {task: first_close_shares(rows) for task, rows in by_task(chosen).items() if grasps(task)},
        "closed_again": {task: closed_again_rate(rows) for task, rows in by_task(chosen).items() if grasps(task)},
        "phrasings": {phrasing: {"success": {t: success_rate(r) for t, r in by_task(rows).items()},
                                 "grounding": {t: grounding_rate(r) for t, r in by_task(rows).items()}}
                      for phrasing, rows in results.items()},
        "verbs": {phrasing: verb_rates(rows, phrasing) for phrasing, rows in results.items()},
        "latency_ms": {"mean": 1e3 * float(np.mean(policy.seconds)), "p50": 1e3 * float(np.median(policy.seconds))},
        "episodes": [asdict(r) for r in chosen],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {out / 'report.json'}" + (f", video: {video}" if video else ""))
    return 0


def phrasing_table(train: list, heldout: list, split: str) -> Table:
    """Success and grounding per task with the training and the held-out phrasings, side by side."""
    table = Table(title=f"phrasings: training vs {split} (same seeds)")
    for column in ("task", "success train", f"success {split}", f"{split} / train", "grounding train",
                   f"grounding {split}"):
        table.add_column(column, justify="left" if column == "task" else "right")
    train, heldout = by_task(train), by_task(heldout)
    for task in train:
        a, b = success_rate(train[task]), success_rate(heldout[task])
        table.add_row(task, f"{100 * a:.1f} %", f"{100 * b:.1f} %", f"{b / a:.2f}" if a else "n/a",
                      f"{100 * grounding_rate(train[task]):.1f} %", f"{100 * grounding_rate(heldout[task]):.1f} %")
    return table


def verb_rates(results: list, split: str) -> dict[str, dict[str, dict]]:
    """Per task, the episodes and success rate of each verb phrase of `split` the instructions used
    ("other": an instruction given with --instruction)."""
    rates = {}
    for task, rows in by_task(results).items():
        verbs = [verb_of(r.instruction, split) or "other" for r in rows]
        rates[task] = {verb: {"episodes": verbs.count(verb),
                              "success": success_rate([r for r, v in zip(rows, verbs) if v == verb])}
                       for verb in dict.fromkeys(verbs)}
    return rates


def verb_table(results: list, split: str) -> Table:
    table = Table(title=f"success per verb phrase, {split} phrasings")
    for column in ("task", "verb phrase", "episodes", "success"):
        table.add_column(column, justify="right" if column in ("episodes", "success") else "left")
    for task, verbs in verb_rates(results, split).items():
        for verb, rate in verbs.items():
            table.add_row(task, verb, str(rate["episodes"]), f"{100 * rate['success']:.0f} %")
    return table
