"""Panda forward kinematics in numpy, so that the `state` vector is a function of joint positions
alone: the simulator, recorded /joint_states and a real robot's /joint_states give the same state.

Modified DH parameters from Franka's documentation; the grasp point is 0.1034 m beyond the flange
(0.107 m flange + 0.105 m from hand to fingertip centre in the URDF, -pi/4 hand yaw).
"""
from __future__ import annotations

import numpy as np

from vla.contracts.observation import STATE_DIM

# (a, d, alpha) per joint, modified DH (Craig)
_DH = np.array([
    [0.0, 0.333, 0.0],
    [0.0, 0.0, -np.pi / 2],
    [0.0, 0.316, np.pi / 2],
    [0.0825, 0.0, np.pi / 2],
    [-0.0825, 0.384, -np.pi / 2],
    [0.0, 0.0, np.pi / 2],
    [0.088, 0.0, np.pi / 2],
])
FLANGE = 0.107
HAND_YAW = -np.pi / 4
GRASP_OFFSET = 0.105


def _dh(a: float, d: float, alpha: float, theta: float) -> np.ndarray:
    ca, sa, ct, st = np.cos(alpha), np.sin(alpha), np.cos(theta), np.sin(theta)
    return np.array([
        [ct, -st, 0, a],
        [st * ca, ct * ca, -sa, -d * sa],
        [st * sa, ct * sa, ca, d * ca],
        [0, 0, 0, 1],
    ])


def ee_transform(q) -> np.ndarray:
    """4x4 pose of the grasp point in the base frame for arm joint positions q[7]."""
    t = np.eye(4)
    for (a, d, alpha), theta in zip(_DH, q):
        t = t @ _dh(a, d, alpha, theta)
    t = t @ _dh(0.0, FLANGE, 0.0, HAND_YAW)
    t[:3, 3] += t[:3, 2] * GRASP_OFFSET
    return t


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """Rotation matrix -> unit quaternion (x, y, z, w) with w >= 0."""
    w = np.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    x = np.sqrt(max(0.0, 1 + r[0, 0] - r[1, 1] - r[2, 2])) / 2
    y = np.sqrt(max(0.0, 1 - r[0, 0] + r[1, 1] - r[2, 2])) / 2
    z = np.sqrt(max(0.0, 1 - r[0, 0] - r[1, 1] + r[2, 2])) / 2
    x = np.copysign(x, r[2, 1] - r[1, 2])
    y = np.copysign(y, r[0, 2] - r[2, 0])
    z = np.copysign(z, r[1, 0] - r[0, 1])
    quat = np.array([x, y, z, w])
    return quat / np.linalg.norm(quat)


def state_from_joints(arm_positions, finger_positions) -> np.ndarray:
    """The observation `state` (vla.contracts.observation.STATE_LAYOUT) from 7 arm and 2 finger positions."""
    q = np.asarray(arm_positions, dtype=np.float64)
    fingers = np.asarray(finger_positions, dtype=np.float64)
    if q.shape != (7,) or fingers.shape != (2,):
        raise ValueError(f"need 7 arm and 2 finger joint positions, got {q.shape} and {fingers.shape}")
    t = ee_transform(q)
    state = np.empty(STATE_DIM, dtype=np.float32)
    state[:7] = q
    state[7] = fingers.sum()
    state[8:11] = t[:3, 3]
    state[11:15] = matrix_to_quaternion(t[:3, :3])
    return state
