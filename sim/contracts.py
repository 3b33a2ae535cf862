"""The observation and action contracts, defined once for sim, episodes, policies and ROS.

Frames follow REP-103: metres, radians, the robot base frame has x forward, y left, z up.
The table top is the plane z = 0 and the robot base sits at the origin.
"""
from __future__ import annotations

import string

import gymnasium as gym
import numpy as np

# ---- proprioceptive state -------------------------------------------------------------
# float32[15], in this order:
STATE_LAYOUT = (
    ("joint_positions", 7),  # Panda joints 1..7 [rad]
    ("gripper_width", 1),  # distance between the fingers [m], 0 .. 0.08
    ("ee_position", 3),  # grasp point between the fingertips, base frame [m]
    ("ee_quaternion", 4),  # its orientation, base frame, (x, y, z, w)
)
STATE_DIM = sum(n for _, n in STATE_LAYOUT)
STATE_SLICES = {}
_start = 0
for _name, _n in STATE_LAYOUT:
    STATE_SLICES[_name] = slice(_start, _start + _n)
    _start += _n
ARM_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINT_NAMES = ("panda_finger_joint1", "panda_finger_joint2")

# ---- IMU --------------------------------------------------------------------------------
# float32[W, 6]: (ax, ay, az) specific force in m/s^2 (gravity included: +9.81 on the up axis at
# rest) and (gx, gy, gz) angular rate in rad/s, in the frame of the IMU on the Panda hand, oldest
# sample first.
IMU_CHANNELS = 6

# ---- action -----------------------------------------------------------------------------
# float32[7] = (dx, dy, dz, droll, dpitch, dyaw, gripper): end-effector deltas per control step
# in the base frame; gripper 1 = open, 0 = closed.
ACTION_DIM = 7
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
MAX_TRANSLATION = 0.05  # m per control step
MAX_ROTATION = 0.3  # rad per control step
ACTION_LOW = np.array([-MAX_TRANSLATION] * 3 + [-MAX_ROTATION] * 3 + [0.0], dtype=np.float32)
ACTION_HIGH = np.array([MAX_TRANSLATION] * 3 + [MAX_ROTATION] * 3 + [1.0], dtype=np.float32)
# The end effector is kept inside this box (base frame, metres) whatever the commands.
WORKSPACE_LOW = np.array([0.15, -0.45, 0.005])
WORKSPACE_HIGH = np.array([0.85, 0.45, 0.55])

INSTRUCTION_MAX_LENGTH = 128
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"


def clip_action(action) -> np.ndarray:
    """Return the action as float32[7] inside the limits; raise on wrong shape or NaN/inf."""
    a = np.asarray(action, dtype=np.float32)
    if a.shape != (ACTION_DIM,):
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action contains NaN or inf: {a.tolist()}")
    return np.clip(a, ACTION_LOW, ACTION_HIGH)


def observation_space(image_size: int, imu_window: int, wrist_camera: bool) -> gym.spaces.Dict:
    image = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
    spaces = {
        "image": image,
        "state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32),
        "imu": gym.spaces.Box(-np.inf, np.inf, (imu_window, IMU_CHANNELS), np.float32),
        "instruction": gym.spaces.Text(INSTRUCTION_MAX_LENGTH, charset=INSTRUCTION_CHARSET),
    }
    if wrist_camera:
        spaces["wrist_image"] = image
    return gym.spaces.Dict(spaces)


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
