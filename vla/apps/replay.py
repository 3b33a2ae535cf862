"""`vla replay EPISODE`: re-execute a sim episode's recorded actions from its recorded seed and
measure how far the replayed states drift from the recorded /joint_states (0 when deterministic).

    vla replay datasets/pick/episode_000003 --video outputs/replay.mp4
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim import SimConfig, make_env
from vla.apps.video import annotate, write_video
from vla.contracts.observation import STATE_SLICES
from vla.data.reader import Episode, read_episode


@dataclass
class ReplayReport:
    path: Path
    steps: int
    max_state_error: float  # max |recorded - replayed| over all state entries and steps
    max_ee_error: float  # metres, end-effector position
    max_image_error: int  # max |pixel difference| of the camera images (-1: sizes differ)
    recorded_success: bool
    replayed_success: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("episode", help="episode directory (rosbag2) recorded in sim")
    parser.add_argument("--video", help="also render the replay to this .mp4/.gif")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max state error counted as a match")


def run(args) -> int:
    report = replay(args.episode, video=args.video)
    print(f"{report.path}: {report.steps} steps replayed\n"
          f"  max state error      {report.max_state_error:.3g}\n"
          f"  max end-effector err {report.max_ee_error:.3g} m\n"
          f"  max image difference {report.max_image_error}\n"
          f"  success recorded / replayed: {report.recorded_success} / {report.replayed_success}")
    if args.video:
        print(f"video: {args.video}")
    ok = report.max_state_error <= args.tolerance and report.recorded_success == report.replayed_success
    print("replay matches the recording" if ok else f"replay DIVERGES (tolerance {args.tolerance})")
    return 0 if ok else 1


def replay(path: str | Path, video: str | Path | None = None) -> ReplayReport:
    episode = read_episode(path)
    env = make_env(episode.info["task"], _sim_config(episode), render_mode="rgb_array" if video else None)
    try:
        states, images, success, frames = _run(env, episode, video is not None)
    finally:
        env.close()
    n = min(len(states), len(episode.states))  # they differ only if the replay ended at another step
    recorded, states = episode.states[:n], states[:n]
    errors = np.abs(recorded - states)
    ee = STATE_SLICES["ee_position"]
    same_size = all(a.shape == b.shape for a, b in zip(episode.images, images))
    image_error = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(episode.images, images)) if same_size else -1
    if video:
        write_video(video, frames, fps=int(episode.info["control_hz"]))
    return ReplayReport(episode.path, len(states) - 1, float(errors.max()),
                        float(np.linalg.norm(recorded[:, ee] - states[:, ee], axis=1).max()), image_error,
                        bool(episode.info["success"]), success)


def _sim_config(episode: Episode) -> SimConfig:
    values = episode.info.get("sim_config")
    if not isinstance(values, dict) or not isinstance(episode.info["seed"], int):
        raise ValueError(
            f"{episode.path}: not a sim episode (no sim_config mapping or seed in its metadata); "
            "only sim episodes replay"
        )
    return SimConfig.from_dict(values | {"gui": False}, f"{episode.path}: sim_config")


def _run(env, episode: Episode, film: bool):
    """Reset with the recorded seed and step the recorded actions; returns the states and images
    after reset and after every step, the final success and the video frames."""
    obs, info = env.reset(seed=int(episode.info["seed"]))
    states, images, frames = [obs["state"]], [obs["image"]], []
    for t, action in enumerate(episode.actions):
        if film:
            frames.append(_frame(env, episode, t, states))
        obs, _, terminated, truncated, info = env.step(action)
        states.append(obs["state"])
        images.append(obs["image"])
        if terminated or truncated:
            break
    if film:
        frames.append(_frame(env, episode, len(states) - 1, states))
    return np.stack(states), images, bool(info["success"]), frames


def _frame(env, episode: Episode, t: int, states: list) -> np.ndarray:
    error = float(np.abs(episode.states[t] - states[t]).max()) if t < len(episode.states) else float("nan")
    return annotate(env.render(), [episode.info["instruction"], f"replay step {t}  state error {error:.2g}"])
