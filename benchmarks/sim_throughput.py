"""Simulator throughput on one core: control steps/s with the 96x96 camera, expert episodes/hour,
and panda-gym's PandaPickAndPlace-v3 with a 96x96 render in the same run (when installed).

    python benchmarks/sim_throughput.py [--seconds 20] [--image-size 96]
Targets: >= 6x panda-gym's steps/s at the same image size; >= 3,000 expert episodes/hour/core.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from policies import load_policy
from sim import TASKS, SimConfig, make_env


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def our_steps_per_second(image_size: int, seconds: float) -> float:
    """Random actions, resets excluded: the cost of one control step (physics + camera + IMU)."""
    env = make_env("pick", SimConfig(image_size=image_size))
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    steps, busy = 0, 0.0
    while busy < seconds:
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(
            rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        )
        busy += time.perf_counter() - start
        steps += 1
        if terminated or truncated:
            env.reset()
    return steps / busy


def expert_episodes_per_hour(image_size: int, seconds: float) -> tuple[float, float]:
    """Whole expert episodes (resets included), cycling over every task; returns (episodes/h, success)."""
    envs = {task: make_env(task, SimConfig(image_size=image_size)) for task in TASKS}
    experts = {task: load_policy("expert", env) for task, env in envs.items()}
    episodes, successes, start, seed = 0, 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for task, env in envs.items():
            obs, _ = env.reset(seed=seed)
            experts[task].reset(obs["instruction"])
            while True:
                obs, _, terminated, truncated, info = env.step(experts[task].act(obs))
                if terminated or truncated:
                    break
            episodes, successes = episodes + 1, successes + info["success"]
        seed += 1
    return episodes / (time.perf_counter() - start) * 3600, successes / episodes


def panda_gym_steps_per_second(image_size: int, seconds: float) -> float | None:
    try:
        import gymnasium as gym
        import panda_gym  # noqa: F401  (registers the envs)
    except ImportError:
        return None
    env = gym.make("PandaPickAndPlace-v3", render_mode="rgb_array", render_width=image_size, render_height=image_size)
    env.reset(seed=0)
    steps, busy = 0, 0.0
    while busy < seconds:
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        env.render()  # the observation image, as ours renders one per step
        busy += time.perf_counter() - start
        steps += 1
        if terminated or truncated:
            env.reset()
    env.close()
    return steps / busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per figure")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    pin_to_one_core()
    ours = our_steps_per_second(args.image_size, args.seconds)
    episodes, success = expert_episodes_per_hour(args.image_size, args.seconds)
    baseline = panda_gym_steps_per_second(args.image_size, args.seconds)

    table = Table(title=f"simulator throughput, one core, {args.image_size}x{args.image_size} camera")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    table.add_row("control steps/s (ours: 24 physics substeps + camera + IMU)", f"{ours:.1f}", "")
    table.add_row("expert episodes/hour (all tasks, resets included)", f"{episodes:,.0f}", ">= 3,000")
    table.add_row("expert success during the run", f"{100 * success:.1f} %", "")
    if baseline is None:
        table.add_row("panda-gym PandaPickAndPlace-v3 steps/s", "not installed (pip install panda-gym)", "")
    else:
        table.add_row("panda-gym PandaPickAndPlace-v3 steps/s (step + render)", f"{baseline:.1f}", "")
        table.add_row("ratio ours / panda-gym", f"{ours / baseline:.1f}x", ">= 6x")
    Console().print(table)


if __name__ == "__main__":
    main()
