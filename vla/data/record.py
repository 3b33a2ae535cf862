"""Run one sim episode with a policy and record it as a rosbag2 directory."""
from __future__ import annotations

import dataclasses
import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

import vla
from vla.contracts import topics as T
from vla.data import messages as M
from vla.data.writer import EpisodeWriter

FORMAT = "vla-episode/1"


def versions() -> dict:
    """Package versions and the source commit, stored with every episode (replays depend on them)."""
    found = {name: metadata.version(name) for name in ("pybullet", "rosbags", "numpy")}
    found["vla-stack"] = vla.__version__
    found["python"] = platform.python_version()
    try:
        found["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def record_episode(env, policy, seed: int, path: Path, extra: dict | None = None) -> dict:
    """Reset `env` with `seed`, run `policy` to the end and write the bag at `path` (created).
    Returns the episode metadata (also stored in the bag)."""
    sim = env.unwrapped
    cfg = sim.config
    writer = EpisodeWriter(path, cfg.wrist_camera)
    try:
        obs, info = env.reset(seed=seed)
        policy.reset(obs["instruction"])
        writer.write("instruction", T.step_stamp(0, cfg.control_hz), M.string_fields(obs["instruction"]))
        _write_observation(writer, sim, obs, 0)
        steps = 0
        while True:
            obs, _, terminated, truncated, info = env.step(policy.act(obs))
            # the action the robot executed (clipped to the limits), stamped with the observation it answers
            _write_action(writer, info["action"], T.step_stamp(steps, cfg.control_hz), cfg.control_hz)
            steps += 1
            _write_observation(writer, sim, obs, steps)
            if terminated or truncated:
                break
        episode = episode_info(sim, obs["instruction"], seed, bool(info["success"]), steps) | (extra or {})
        if getattr(policy, "expert_from", None) is not None:  # training reads the steps from there on
            episode["expert_from"] = policy.expert_from
        writer.close(episode)
    except BaseException:
        writer.abort()
        raise
    return episode


def _write_observation(writer: EpisodeWriter, sim, obs: dict, step: int) -> None:
    """Camera(s) and joint states at the step's stamp, and the IMU samples since the previous step."""
    stamp = T.step_stamp(step, sim.config.control_hz)
    writer.write("image", stamp, M.image_fields(obs["image"], stamp))
    if "wrist_image" in obs:
        writer.write("wrist_image", stamp, M.image_fields(obs["wrist_image"], stamp, T.WRIST_CAMERA_FRAME))
    writer.write("joint_states", stamp, M.joint_state_fields(*sim.robot.joint_states(), stamp))
    samples = sim.imu.take_fresh()
    for sample, imu_stamp in zip(samples, T.imu_stamps(stamp, len(samples), sim.config.imu_hz)):
        writer.write("imu", imu_stamp, M.imu_fields(sample, imu_stamp))


def _write_action(writer: EpisodeWriter, action: np.ndarray, stamp: int, control_hz: int) -> None:
    writer.write("action", stamp, M.action_fields(action))
    writer.write("cmd_twist", stamp, M.twist_fields(action, control_hz, stamp))
    writer.write("gripper", stamp, M.gripper_fields(action))


def episode_info(sim, instruction: str, seed: int, success: bool, steps: int, source: str = "sim") -> dict:
    """The metadata stored with an episode of the simulator `sim` (see datasets/README.md)."""
    cfg = sim.config
    return {
        "format": FORMAT, "source": source, "task": sim.task.name, "instruction": instruction, "seed": seed,
        "success": success, "steps": steps, "control_hz": cfg.control_hz, "imu_hz": cfg.imu_hz,
        "imu_window": cfg.imu_window, "image_size": cfg.image_size, "wrist_camera": cfg.wrist_camera,
        "stamp_epoch_ns": T.EPOCH_NS, "sim_config": dataclasses.asdict(cfg),
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
