"""Scripted experts: success and mean episode length per task, plainly and with a policy's mistakes
mixed in (a random action, gripper included, in place of a share of the expert's own over the first
30 steps). An expert that labels the states a learned policy visits (DAgger) must recover from them.

    python benchmarks/expert_robustness.py [--episodes 30] [--perturb 0.3]
Seeds 5,000,000 + i: neither training, test nor validation seeds.
"""
from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from policies import load_policy
from sim import TASKS, make_env

SEED = 5_000_000
PERTURBED_STEPS = 30


def run(task: str, episodes: int, perturb: float, first_seed: int = SEED) -> tuple[float, float]:
    """(success rate, mean steps) of the expert on seeds first_seed + i, with a random action in
    place of its own with probability `perturb` in each of the first PERTURBED_STEPS steps."""
    env, rng = make_env(task), np.random.default_rng(0)
    expert = load_policy("expert", env)
    successes, steps = 0, []
    for i in range(episodes):
        obs, _ = env.reset(seed=first_seed + i)
        expert.reset(obs["instruction"])
        for step in range(env.max_steps):
            action = expert.act(obs)
            if step < PERTURBED_STEPS and rng.random() < perturb:
                action = np.concatenate([rng.uniform(-0.05, 0.05, 3), np.zeros(3), [rng.integers(2)]])
            obs, _, terminated, truncated, info = env.step(action.astype(np.float32))
            if terminated or truncated:
                break
        successes += info["success"]
        steps.append(step + 1)
    env.close()
    return successes / episodes, float(np.mean(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=30, help="per task")
    parser.add_argument("--perturb", type=float, default=0.3, help="share of random actions in the first 30 steps")
    args = parser.parse_args()
    table = Table(title=f"scripted experts, {args.episodes} seeds per task")
    for column in ("task", "success", "mean steps", f"success, {args.perturb:.0%} random", "mean steps"):
        table.add_column(column)
    for task in TASKS:
        plain, perturbed = run(task, args.episodes, 0.0), run(task, args.episodes, args.perturb)
        table.add_row(task, f"{100 * plain[0]:.0f} %", f"{plain[1]:.1f}", f"{100 * perturbed[0]:.0f} %",
                      f"{perturbed[1]:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
