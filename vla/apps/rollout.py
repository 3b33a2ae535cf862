"""Closed-loop rollouts in sim: run a policy on tasks for N episodes, tabulate success, film it.

`vla sim --task all --policy expert --episodes 20 --video outputs/expert.mp4`
`vla sim --policy CKPT --randomize lighting,shades,jitter --instruction "grab the {colour} {shape}"`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from policies import load_policy
from sim import TASKS, SimConfig, make_env
from sim.config import CAMERA_JITTER, DISTURBANCE, SAME_COLOUR, randomization
from sim.language import SPLITS
from vla.apps.video import annotate, grid, write_video
from vla.contracts.observation import ObservationSpec

# Seed ranges that never overlap: training data from 0, evaluation (the test set: vla eval, vla demo)
# from EVAL_SEED_OFFSET, evaluation during training (what a learning curve or a choice of
# checkpoint sees) from TRAINING_EVAL_SEED_OFFSET, the export's validation observations from
# 2,000,000 (vla.apps.export), and a recipe's DAgger corrections (data.corrections) from
# CORRECTIONS_SEED_OFFSET.
EVAL_SEED_OFFSET = 1_000_000
CORRECTIONS_SEED_OFFSET = 500_000
TRAINING_EVAL_SEED_OFFSET = 3_000_000
# CPU threads for a checkpoint's inference in the jobs. One: a batch-1 control step of these models
# gains little from intra-op parallelism, and on a CPU shared with other work (the simulator,
# other jobs) more threads busy-wait for each other (the default checkpoint on a loaded 2-core
# machine, p50 per step: 21 ms with 1 thread, 407 ms with 2). `--threads 0`: the backend's default.
THREADS = 1
CLOSE_NEAR = 0.05  # m: a first gripper closure this near an object's centre (a bin's outline), seen from above
CLOSE_PLACES = ("the target", "a bin", "another object", "nothing", "never")


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    instruction: str
    target: str  # the object the instruction names
    touched: str | None  # the object the gripper reached first (None: none)
    stages: list[str] = dataclasses.field(default_factory=list)  # the task's stages reached (sim.tasks)
    first_close: dict | None = None  # where the gripper was first commanded closed (sim.env); None: never
    closures: int = 0  # times the gripper was commanded shut from open (2 or more: it tried again)


def run_episode(env, policy, seed: int, frames: list | None = None, instruction: str | None = None) -> EpisodeResult:
    """One episode; `instruction` replaces the task's own (a template: sim.env.TabletopEnv). Video
    frames, captioned with the instruction, go to `frames` if given."""
    obs, info = env.reset(seed=seed, options=None if instruction is None else {"instruction": instruction})
    policy.reset(obs["instruction"])
    success, steps = False, 0
    while True:
        if frames is not None:
            frames.append(annotate(env.render(), [obs["instruction"], f"{env.task.name}, seed {seed}, step {steps}"]))
        obs, _, terminated, truncated, info = env.step(policy.act(obs))
        steps += 1
        success = bool(info["success"])
        if terminated or truncated:
            break
    if frames is not None:
        colour = (80, 255, 80) if success else (255, 80, 80)
        last = annotate(env.render(), [obs["instruction"], "SUCCESS" if success else "FAILED"], colour)
        frames.extend([last] * 5)
    return EpisodeResult(env.task.name, seed, success, steps, obs["instruction"], info["target"], info["touched"],
                         info["stages"], info["first_close"], info["closures"])


def run_episodes(
    tasks,
    make_policy,
    episodes: int,
    seed: int,
    config: SimConfig | None = None,
    video: str | Path | None = None,
    video_episodes: int = 2,
    progress: bool = True,
    instruction: str | None = None,
) -> list[EpisodeResult]:
    """`make_policy(env)` builds the policy for one task's env. Seeds are seed, seed+1, ...
    `instruction`: every episode's instead of the task's own (None: the task's). `video`: the first
    `video_episodes` of each task side by side, a row per episode, a column per task."""
    results, films = [], []
    for task in tasks:
        env = make_env(task, config, render_mode="rgb_array" if video else None)
        try:
            policy = make_policy(env)
            for i in tqdm(range(episodes), desc=task, disable=not progress, leave=False):
                film = [] if video and i < video_episodes else None
                results.append(run_episode(env, policy, seed + i, film, instruction))
                films += [film] if film else []
        finally:
            env.close()
    if video:
        # task-major films -> episode rows: the i-th episode of every task in row i
        filmed = min(episodes, video_episodes)
        write_video(video, grid([films[t * filmed + i] for i in range(filmed) for t in range(len(tasks))], len(tasks)))
    return results


def run_policy(
    policy: str,
    tasks: list[str],
    episodes: int,
    seed: int,
    video: str | Path | None = None,
    video_episodes: int = 2,
    progress: bool = True,
    instruction: str | None = None,
    threads: int = 0,
    **settings,
) -> list[EpisodeResult]:
    """Run `policy` ('expert', 'random' or a checkpoint directory) for `episodes` per task from
    `seed` on. A checkpoint's policy gets the observations its model takes and runs on `threads`
    CPU threads (0: the backend's default); `settings` are the other SimConfig fields (and
    image_size etc. for the expert and random policies). `instruction`: see run_episodes."""
    if policy in ("expert", "random"):
        return run_episodes(
            tasks,
            lambda env: load_policy(policy, env, seed=seed),
            episodes,
            seed,
            SimConfig(**settings),
            video,
            video_episodes,
            progress,
            instruction,
        )
    loaded = load_policy(policy, threads=threads)
    observed = {f.name for f in dataclasses.fields(ObservationSpec)}
    config = SimConfig.for_spec(loaded.spec, **{k: v for k, v in settings.items() if k not in observed})
    return run_episodes(tasks, lambda env: loaded, episodes, seed, config, video, video_episodes, progress, instruction)


def success_table(results: list[EpisodeResult], title: str = "success") -> Table:
    table = Table(title=title)
    for column in ("task", "episodes", "success rate", "grounding", "mean steps"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, rows in [*by_task(results).items(), ("all", results)]:
        table.add_row(
            task,
            str(len(rows)),
            f"{100 * success_rate(rows):.1f} %",
            f"{100 * grounding_rate(rows):.1f} %",
            f"{np.mean([r.steps for r in rows]):.1f}",
            style="bold" if task == "all" else None,
        )
    table.caption = "grounding: episodes in which the first object the gripper reached is the instructed one"
    return table


def stage_table(results: list[EpisodeResult], title: str = "stages reached") -> Table | None:
    """Per task, the share of episodes that reached each of its stages, then success: where the
    policy fails (pick: touched, lifted; place: touched, lifted, over bin), and for tasks that
    grasp, where the gripper first closed. None: no task has stages."""
    staged = {task: rows for task, rows in by_task(results).items() if TASKS[task].stages}
    if not staged:
        return None
    table = Table(title=title)
    table.add_column("task")
    table.add_column("stages reached, then success (share of episodes)")
    table.add_column("gripper first closed at")
    for task, rows in staged.items():
        shares = [f"{stage} {100 * stage_rate(rows, stage):.0f} %" for stage in TASKS[task].stages]
        closes = ([f"{place} {100 * share:.0f} %" for place, share in first_close_shares(rows).items()]
                  + [f"closed again {100 * closed_again_rate(rows):.0f} %"]) if grasps(task) else []
        table.add_row(task, " -> ".join([*shares, f"success {100 * success_rate(rows):.0f} %"]), ", ".join(closes))
    table.caption = (f"closed at: the object nearest the grasp point seen from above, within {CLOSE_NEAR * 100:.0f} cm "
                     "of its centre (of a bin's outline); closed again: opened and closed once more (a retry)")
    return table


def grasps(task: str) -> bool:
    return "lifted" in TASKS[task].stages


def first_close_shares(results: list[EpisodeResult]) -> dict[str, float]:
    """Where the gripper first closed, as shares of the episodes: at the target, a bin, another
    object, none within CLOSE_NEAR, or never (place fails mostly by closing at a bin: the recipe)."""
    def place(r: EpisodeResult) -> str:
        if r.first_close is None:
            return "never"
        name = r.first_close["object"]
        if r.first_close["distance"] > CLOSE_NEAR:
            return "nothing"
        return "the target" if name == r.target else "a bin" if name.endswith(" bin") else "another object"

    places = [place(r) for r in results]
    return {name: places.count(name) / len(places) for name in CLOSE_PLACES}


def closed_again_rate(results: list[EpisodeResult]) -> float:
    """The share of episodes in which the gripper opened after a closure and closed again: retries."""
    return float(np.mean([r.closures >= 2 for r in results]))


def by_task(results: list[EpisodeResult]) -> dict[str, list[EpisodeResult]]:
    """Results grouped by task, tasks in the order they first appear."""
    return {task: [r for r in results if r.task == task] for task in dict.fromkeys(r.task for r in results)}


def success_rate(results: list[EpisodeResult]) -> float:
    return float(np.mean([r.success for r in results]))


def grounding_rate(results: list[EpisodeResult]) -> float:
    return float(np.mean([r.touched == r.target for r in results]))


def stage_rate(results: list[EpisodeResult], stage: str) -> float:
    return float(np.mean([stage in r.stages for r in results]))


def parse_tasks(spec: str) -> list[str]:
    tasks = list(TASKS) if spec == "all" else spec.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)} or 'all'")
    return tasks


def add_randomize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--randomize",
        default="",
        metavar="NAMES",
        help="domain randomisation, comma-separated: lighting, shades (object colours), jitter (camera, "
        f"{CAMERA_JITTER} m; jitter=METRES for another magnitude), all (those three) or disturbance (pushes "
        f"on the hand's motion, {DISTURBANCE} m; disturbance=METRES), same_colour (in {100 * SAME_COLOUR:.0f} %% of "
        "scenes a distractor of the target's colour and another shape; same_colour=SHARE). A seed keeps its "
        "scene either way (same_colour: its objects' places)",
    )


def add_episode_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of how episodes run, shared by `vla sim`, `vla eval` and `vla demo`."""
    add_randomize_argument(parser)
    parser.add_argument(
        "--instruction",
        help="every episode's instruction instead of the task's own; {colour} and {shape} (the object the task "
        "is about), {bin_colour} (place) and {place} (push) are filled in: 'grab the {colour} {shape}'. "
        "Success is still judged on the task's object",
    )
    parser.add_argument(
        "--phrasings",
        choices=SPLITS,
        default="train",
        help="how instructions are put (sim.language): train (the phrasings training draws from), heldout "
        "(other frames and verbs) or synonyms (those, and names for objects training never used); the last two "
        "are for evaluation only",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"CPU threads for a checkpoint's inference (default {THREADS}: fastest on a shared CPU; "
        "0: the backend's default, one per core)",
    )


def randomize_settings(args) -> dict:
    """The SimConfig switches that --randomize names (a one-line error for others)."""
    try:
        return randomization(args.randomize)
    except ValueError as exc:
        raise ValueError(f"--randomize: {exc}") from None


def episode_settings(args) -> dict:
    """The SimConfig settings of --randomize and --phrasings, after checking --threads."""
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: the backend's default), got {args.threads}")
    return randomize_settings(args) | {"phrasing": args.phrasings}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="expert", help="expert | random | a checkpoint directory")
    parser.add_argument("--task", default="all", help=f"comma-separated tasks or 'all' ({', '.join(TASKS)})")
    parser.add_argument("--episodes", type=int, default=10, help="per task")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed")
    parser.add_argument(
        "--image-size",
        type=int,
        default=SimConfig.image_size,
        help="camera size for the expert and random policies (a checkpoint's model sets its own)",
    )
    parser.add_argument("--gui", action="store_true", help="open the PyBullet GUI to watch")
    parser.add_argument("--video", help="write the first episodes of each task to this .mp4/.gif")
    parser.add_argument("--video-episodes", type=int, default=2)
    parser.add_argument("--report", help="write per-episode results to this JSON file")
    add_episode_arguments(parser)


def report(results: list[EpisodeResult], title: str, path: str | None) -> None:
    Console().print(success_table(results, title))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps([asdict(r) for r in results], indent=1))


def run(args) -> int:
    if args.episodes <= 0:
        raise ValueError(f"--episodes must be positive, got {args.episodes}")
    settings = episode_settings(args)
    results = run_policy(
        args.policy,
        parse_tasks(args.task),
        args.episodes,
        args.seed,
        args.video,
        args.video_episodes,
        instruction=args.instruction,
        threads=args.threads,
        image_size=args.image_size,
        gui=args.gui,
        **settings,
    )
    report(results, f"{args.policy} policy", args.report)
    if args.video:
        print(f"video: {args.video}")
    return 0
