"""The action contract: float32[7] = (dx, dy, dz, droll, dpitch, dyaw, gripper), end-effector
deltas per control step in the robot base frame (REP-103), gripper 1 = open, 0 = closed. The
limits live here and nowhere else."""
from __future__ import annotations

import numpy as np

ACTION_DIM = 7
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
GRIPPER = 6  # index of the gripper opening in an action
CLOSING = 0.5  # a gripper opening below this is a command to close the hand (the rest, to open it)
MAX_TRANSLATION = 0.05  # m per control step
MAX_ROTATION = 0.3  # rad per control step
ACTION_LOW = np.array([-MAX_TRANSLATION] * 3 + [-MAX_ROTATION] * 3 + [0.0], dtype=np.float32)
ACTION_HIGH = np.array([MAX_TRANSLATION] * 3 + [MAX_ROTATION] * 3 + [1.0], dtype=np.float32)
# The end effector is kept inside this box (base frame, metres) whatever the commands. The floor
# keeps the fingertips (~7 mm below the grasp point) off the table: at 5 mm they pressed into it with
# ~50 N each, and a policy that came down too far stalled there (36 of the default's 37 failed pushes
# on 150 validation seeds). No expert command goes lower (its grasp point stops at 12 mm).
WORKSPACE_LOW = np.array([0.15, -0.45, 0.012])
WORKSPACE_HIGH = np.array([0.85, 0.45, 0.55])


def clip_action(action) -> np.ndarray:
    """The action (float32[7], or [..., 7] for several) inside the limits; ValueError on a wrong
    shape or NaN/inf."""
    a = np.asarray(action, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] != ACTION_DIM:
        raise ValueError(f"action must have shape ({ACTION_DIM},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action contains NaN or inf: {a.tolist()}")
    return np.clip(a, ACTION_LOW, ACTION_HIGH)


def keep_in_workspace(action: np.ndarray, ee_position) -> np.ndarray:
    """`action` with its translation cut so that the hand at `ee_position` (base frame) moves no
    further out of the workspace box: from inside it stays inside; from outside (a robot started
    there) it may only come back, never pulled in by a jump. What policy_node commands a real robot,
    whose driver knows no box (the simulator clips its own target into the box: the same inside)."""
    a = np.array(action, dtype=np.float32)
    ee = np.asarray(ee_position, dtype=np.float64)
    low, high = np.minimum(WORKSPACE_LOW - ee, 0.0), np.maximum(WORKSPACE_HIGH - ee, 0.0)
    a[:3] = np.clip(a[:3], low, high)
    return a
