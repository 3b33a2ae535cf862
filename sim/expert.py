"""Scripted experts: closed-loop controllers over privileged simulator state.

They emit the same 7-D actions a learned policy does, so their episodes are training data.
"""
from __future__ import annotations

import numpy as np
import pybullet as p

from sim.robot import FINGER_JOINTS
from sim.scene import BIN_HEIGHT, BIN_INNER_HALF, CUBE_HALF
from sim.tasks import Pick, Place, Push, Reach
from vla.contracts.action import ACTION_HIGH, ACTION_LOW, MAX_TRANSLATION

OPEN, CLOSED = 1.0, 0.0
HOVER = 0.10  # approach height above the table


def _wrap(angle: float, period: float) -> float:
    """Angle wrapped into [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


class ScriptedExpert:
    """Call reset() after env.reset(), then act(obs) each step (the Policy interface).

    Stateless: the action is a function of the simulator's current state alone (poses, contacts,
    gripper width), never of a phase remembered from earlier steps. So it labels any state a policy
    visits (DAgger, noise injection), recovers by itself from a dropped cube or an empty grasp, and
    its demonstrations show a memoryless policy no action that depends on earlier steps."""

    def __init__(self, env):
        self.env = env.unwrapped
        self.spec = self.env.config.spec

    def reset(self, instruction: str = "") -> None:
        """Nothing to forget: the expert keeps no state between steps."""

    def act(self, obs=None) -> np.ndarray:
        task = self.env.task
        if isinstance(task, Reach):
            return self._reach(task)
        if isinstance(task, Place):
            return self._place(task)
        if isinstance(task, Pick):
            return self._pick(task)
        if isinstance(task, Push):
            return self._push(task)
        raise TypeError(f"no scripted expert for task {task.name!r}")

    # ---- motion primitives and state ------------------------------------------------------
    def _pose(self):
        pos, quat = self.env.robot.ee_pose()
        rot = np.array(p.getMatrixFromQuaternion(quat)).reshape(3, 3)
        return pos, rot

    def _gripper_yaw(self) -> float:
        rot = self._pose()[1]
        return float(np.arctan2(rot[1, 0], rot[0, 0]))

    def _aligned_yaw(self, obj) -> float:
        """The gripper yaw closest to the current one that puts the fingers across a cube's faces."""
        current = self._gripper_yaw()
        return current + _wrap(self.env.scene.yaw(obj) - current, np.pi / 2)

    def _width(self) -> float:
        return float(self.env.robot.state()[7])

    def _holding(self, obj) -> bool:
        """Both fingers touch `obj` and the gripper is not shut: it is in the hand."""
        links = {c[4] for c in p.getContactPoints(obj.body, self.env.robot.body, physicsClientId=self.env.client)}
        return set(FINGER_JOINTS) <= links and self._width() > 0.02  # a joint's child link has its index

    def _move(self, target, gripper: float, yaw: float | None = None, speed: float = MAX_TRANSLATION) -> np.ndarray:
        pos, rot = self._pose()
        yaw = self._gripper_yaw() if yaw is None else yaw
        c, s = np.cos(yaw), np.sin(yaw)
        desired = np.array([[c, s, 0], [s, -c, 0], [0, 0, -1.0]])  # pointing down, x axis at `yaw`
        rotvec = _rotation_vector(desired @ rot.T)
        action = np.zeros(7, dtype=np.float32)
        action[:3] = np.clip(np.asarray(target) - pos, -speed, speed)
        action[3:6] = rotvec
        action[6] = gripper
        return np.clip(action, ACTION_LOW, ACTION_HIGH)

    def _near(self, target, tolerance: float) -> bool:
        return bool(np.linalg.norm(self._pose()[0] - np.asarray(target)) < tolerance)

    # ---- tasks ----------------------------------------------------------------------------
    def _reach(self, task: Reach) -> np.ndarray:
        top = self.env.scene.position(task.target) + [0, 0, task.target.half_height + 0.005]
        ee = self._pose()[0]
        if np.linalg.norm(ee[:2] - top[:2]) < 0.02 and ee[2] < top[2] + 0.08:  # above it: down onto it
            return self._move(top, OPEN)
        return self._move(top + [0, 0, 0.06], OPEN)

    def _grasp(self, cube) -> np.ndarray | None:
        """The action that gets `cube` into the hand; None once it is held."""
        if self._holding(cube):
            return None
        pos, ee, width = self.env.scene.position(cube), self._pose()[0], self._width()
        yaw = self._aligned_yaw(cube)
        bottom = [pos[0], pos[1], max(pos[2] - 0.005, 0.012)]
        off_centre = np.linalg.norm(ee[:2] - pos[:2])
        if off_centre < 0.012 and ee[2] < bottom[2] + 0.01:  # around it: close (the fingers settle)
            if width < 0.01:  # closed on nothing: open and start over from above
                return self._move([pos[0], pos[1], HOVER], OPEN, yaw)
            return self._move(ee, CLOSED)
        if width < 0.06 and ee[2] < pos[2] + 0.05:  # (half) closed low down without it: open, go up
            return self._move([ee[0], ee[1], ee[2] + 0.03], OPEN, yaw)
        aligned = abs(_wrap(yaw - self._gripper_yaw(), 2 * np.pi)) < 0.08
        if off_centre < 0.015 and aligned and ee[2] < HOVER + 0.015:  # above it: down around it
            return self._move(bottom, OPEN, yaw)
        if ee[2] < pos[2] + 0.035 and off_centre > 0.015:  # low beside it: up first
            return self._move([ee[0], ee[1], HOVER], OPEN, yaw)
        return self._move([pos[0], pos[1], HOVER], OPEN, yaw)

    def _pick(self, task: Pick) -> np.ndarray:
        action = self._grasp(task.target)
        if action is not None:
            return action
        pos = self.env.scene.position(task.target)
        return self._move([pos[0], pos[1], 0.2], CLOSED)

    def _place(self, task: Place) -> np.ndarray:
        box, cube = self.env.scene.position(task.bin), self.env.scene.position(task.target)
        in_bin = np.all(np.abs(cube[:2] - box[:2]) < BIN_INNER_HALF) and cube[2] < BIN_HEIGHT
        if in_bin and not self._holding(task.target):  # released: back off upwards
            return self._move([box[0], box[1], 0.2], OPEN)
        action = self._grasp(task.target)
        if action is not None:
            return action
        ee = self._pose()[0]
        inside = [box[0], box[1], BIN_HEIGHT + 0.04]
        if np.linalg.norm(ee[:2] - box[:2]) < 0.015:  # over the bin: lower into it, then release
            return self._move(ee, OPEN) if self._near(inside, 0.01) else self._move(inside, CLOSED)
        if ee[2] < 0.12 and np.linalg.norm(ee[:2] - box[:2]) > 0.05:  # lift clear of the walls first
            return self._move([ee[0], ee[1], 0.16], CLOSED)
        return self._move([box[0], box[1], 0.16], CLOSED)  # carry it over the bin

    def _push(self, task: Push) -> np.ndarray:
        cube = self.env.scene.position(task.target)[:2]
        ee = self._pose()[0]
        to_goal = task.goal - cube
        if np.linalg.norm(to_goal) < 0.01:
            return self._move(ee, CLOSED)
        u = to_goal / np.linalg.norm(to_goal)
        behind = cube - u * (CUBE_HALF + 0.03)
        offset = ee[:2] - cube
        lateral = offset - offset.dot(u) * u
        on_line = np.linalg.norm(lateral) <= 0.025 and offset.dot(u) <= -0.01
        if ee[2] < 0.035 and on_line:  # down behind it: push along the line to the goal
            return self._move([*(ee[:2] + 0.025 * u - lateral), 0.02], CLOSED)
        if np.linalg.norm(ee[:2] - behind) < 0.015:  # above the spot behind it: down to the table
            return self._move([*behind, 0.02], CLOSED)
        if ee[2] < HOVER - 0.02:  # low but off the line: up first
            return self._move([ee[0], ee[1], HOVER], CLOSED)
        return self._move([*behind, HOVER], CLOSED)


def _rotation_vector(rot: np.ndarray) -> np.ndarray:
    """Axis * angle of a rotation matrix."""
    angle = np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2 * np.sin(angle))
    return axis * angle
