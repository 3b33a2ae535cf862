"""Scripted experts: closed-loop state machines over privileged simulator state.

They emit the same 7-D actions a learned policy does, so their episodes are training data.
"""
from __future__ import annotations

import numpy as np
import pybullet as p

from sim.scene import BIN_HEIGHT, CUBE_HALF
from sim.tasks import Pick, Place, Push, Reach
from vla.contracts.action import ACTION_HIGH, ACTION_LOW, MAX_TRANSLATION

OPEN, CLOSED = 1.0, 0.0
HOVER = 0.10  # approach height above the table
PUSH_LATERAL = 0.025  # m: the hand further than this across the push line has lost the cube
TAKEOVER_GRASP = 0.015  # m: taking over with the grasp point this near where it would close, the expert closes


def _wrap(angle: float, period: float) -> float:
    """Angle wrapped into [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


class ScriptedExpert:
    """Call reset() after env.reset(), then act(obs) each step (the Policy interface).

    A phase machine: each phase (above the object, down around it, close, lift, ...) runs until its
    target is reached, so demonstrations converge before every switch and the fingers close for three
    steps before a lift. A stateless variant that switched as soon as contacts and distances allowed
    (8c6768c) was more robust to injected mistakes, but the small all-task model did not learn from its
    shorter demonstrations (docs/all-tasks-cpu.md)."""

    def __init__(self, env, miss: float = 0.0):
        """`miss` > 0: the first grasp of each episode closes that far (m) beside the cube, then the
        expert notices and tries again: demonstrations of recovering from a missed grasp, worth
        learning from the step after the miss on (`expert_from`)."""
        if not 0 <= miss < 0.1:
            raise ValueError(f"miss must be in [0, 0.1) m, got {miss}")
        self.env = env.unwrapped
        self.spec = self.env.config.spec
        self.miss_distance, self.miss = miss, np.zeros(2)  # miss: (x, y) m off the cube, while pending
        self.missed_at = None

    def reset(self, instruction: str = "") -> None:
        """Start from the current state: mid-episode (taking over from a learned policy) a cube
        already in the fingers is carried on with, a grasp in progress (both fingers on the cube, or
        the hand where the expert would close) is closed and lifted (opening there would demonstrate
        letting go of a good grasp), a push in progress (the hand low behind the cube, on its line to
        the goal) is pushed on (lifting there would demonstrate a detour from a state worth continuing
        from), anything else starts from the approach."""
        self.phase, self.wait = 0, 0
        self.missed_at, self.miss = None, np.zeros(2)
        task = self.env.task
        if isinstance(task, Push) and task.target is not None and self._pushing(task):
            self.phase = 2
        if isinstance(task, Pick | Place) and task.target is not None:
            if self._holds(task.target):
                self.phase = 3
            elif self._grips(task.target) or self._near(self._grasp_point(self.env.scene.position(task.target)),
                                                         TAKEOVER_GRASP):
                self.phase = 2

    @property
    def expert_from(self) -> int | None:
        """With `miss`, in pick and place: the first step after the missed grasp (all steps so far, if
        it has not missed yet). None otherwise: every step is worth learning from."""
        if self.missed_at is not None:
            return self.missed_at
        return self.env.steps if self.miss_distance and isinstance(self.env.task, Pick | Place) else None

    def _holds(self, obj) -> bool:
        """Both fingers on `obj` and it off the table."""
        return self._grips(obj) and self.env.scene.position(obj)[2] > CUBE_HALF + 0.005

    def _grips(self, obj) -> bool:
        """Both fingers on `obj`."""
        robot, scene = self.env.robot, self.env.scene
        return len({c[3] for c in p.getContactPoints(robot.body, obj.body, physicsClientId=scene.client)}) >= 2

    @staticmethod
    def _grasp_point(cube) -> list[float]:
        """Where the grasp point goes to close on a cube at `cube`."""
        return [cube[0], cube[1], max(cube[2] - 0.005, 0.012)]

    def _miss_offset(self, cube, yaw: float) -> np.ndarray:
        """(x, y) off the cube along the finger pads (so the fingers close on nothing rather than
        land on it), on the side with more room from the other objects."""
        along = self.miss_distance * np.array([np.cos(yaw), np.sin(yaw)])
        pos, scene = self.env.scene.position(cube)[:2], self.env.scene
        others = [scene.position(o)[:2] for o in scene.objects if o is not cube]
        return max((along, -along), key=lambda off: min((np.linalg.norm(pos + off - o) for o in others), default=0))

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

    # ---- motion primitives ----------------------------------------------------------------
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
        obj = self.env.scene.position(task.target)
        top = obj + [0, 0, task.target.half_height + 0.005]
        if self.phase == 0:
            above = top + [0, 0, 0.06]
            if self._near(above, 0.02):
                self.phase = 1
            return self._move(above, OPEN)
        return self._move(top, OPEN)

    def _grasp(self, cube) -> np.ndarray | None:
        """Phases 0-2 of picking `cube`; returns None once it is held."""
        pos = self.env.scene.position(cube)
        yaw = self._aligned_yaw(cube)
        if self.miss_distance and self.missed_at is None and not self.miss.any():
            self.miss = self._miss_offset(cube, yaw)
        aim = pos[:2] + self.miss
        if self.phase == 0:  # above the cube, fingers open and aligned
            above = [*aim, HOVER]
            yaw_ok = abs(_wrap(yaw - self._gripper_yaw(), 2 * np.pi)) < 0.08
            if self._near(above, 0.015) and yaw_ok:
                self.phase = 1
            return self._move(above, OPEN, yaw)
        if self.phase == 1:  # down around it
            target = self._grasp_point([*aim, pos[2]])
            if self._near(target, 0.008):
                self.phase, self.wait = 2, 0
            return self._move(target, OPEN, yaw)
        if self.phase == 2:  # close and let the fingers settle
            self.wait += 1
            if self.wait >= 3:
                self.phase = 3
                if self.miss.any():
                    self.miss, self.missed_at = np.zeros(2), self.env.steps + 1  # the step after this one
            return self._move(self._pose()[0], CLOSED)
        if pos[2] < CUBE_HALF + 0.005 and self._pose()[0][2] > pos[2] + 0.04:
            self.phase = 0  # it slipped out: start over
            return self._move(self._pose()[0], OPEN)
        return None

    def _pick(self, task: Pick) -> np.ndarray:
        action = self._grasp(task.target)
        if action is not None:
            return action
        pos = self.env.scene.position(task.target)
        return self._move([pos[0], pos[1], 0.2], CLOSED)

    def _place(self, task: Place) -> np.ndarray:
        if self.phase < 6:
            action = self._grasp(task.target)
            if action is not None:
                return action
        box = self.env.scene.position(task.bin)
        ee = self._pose()[0]
        if self.phase == 3:  # lift clear of the walls
            if ee[2] > 0.12:
                self.phase = 4
            return self._move([ee[0], ee[1], 0.16], CLOSED)
        if self.phase == 4:  # carry over the bin
            above = [box[0], box[1], 0.16]
            if self._near(above, 0.015):
                self.phase = 5
            return self._move(above, CLOSED)
        if self.phase == 5:  # lower into it
            inside = [box[0], box[1], BIN_HEIGHT + 0.04]
            if self._near(inside, 0.01):
                self.phase, self.wait = 6, 0
            return self._move(inside, CLOSED)
        self.wait += 1  # release, then back off upwards
        return self._move([box[0], box[1], 0.2 if self.wait > 3 else ee[2]], OPEN)

    def _push_line(self, task: Push) -> tuple[np.ndarray, np.ndarray, float]:
        """The push's direction (cube to goal, unit), and the hand's offset from the cube across
        that line and along it (negative: behind the cube)."""
        cube = self.env.scene.position(task.target)[:2]
        to_goal = task.goal - cube
        u = to_goal / max(np.linalg.norm(to_goal), 1e-9)
        offset = self._pose()[0][:2] - cube
        return u, offset - offset.dot(u) * u, float(offset.dot(u))

    @staticmethod
    def _on_push_line(lateral: np.ndarray, along: float) -> bool:
        """The hand behind the cube and on its line to the goal (offsets from _push_line)."""
        return np.linalg.norm(lateral) <= PUSH_LATERAL and along <= -0.01

    def _pushing(self, task: Push) -> bool:
        """A push in progress: the hand on the push line at the cube's height."""
        _, lateral, along = self._push_line(task)
        return self._pose()[0][2] < 2 * CUBE_HALF and self._on_push_line(lateral, along)

    def _push(self, task: Push) -> np.ndarray:
        cube = self.env.scene.position(task.target)[:2]
        ee = self._pose()[0]
        if np.linalg.norm(task.goal - cube) < 0.01:
            return self._move(ee, CLOSED)
        u, lateral, along = self._push_line(task)
        behind = cube - u * (CUBE_HALF + 0.03)
        if self.phase == 0:  # above the spot behind the cube
            target = [*behind, HOVER]
            if self._near(target, 0.015):
                self.phase = 1
            return self._move(target, CLOSED)
        if self.phase == 1:  # down to the table
            target = [*behind, 0.02]
            if self._near(target, 0.01):
                self.phase = 2
            return self._move(target, CLOSED)
        if not self._on_push_line(lateral, along):
            self.phase = 3  # off the line: go up and approach again
        if self.phase == 3:
            if ee[2] > HOVER - 0.02:
                self.phase = 0
            return self._move([ee[0], ee[1], HOVER], CLOSED)
        target_xy = ee[:2] + 0.025 * u - lateral
        return self._move([*target_xy, 0.02], CLOSED)


def _rotation_vector(rot: np.ndarray) -> np.ndarray:
    """Axis * angle of a rotation matrix."""
    angle = np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2 * np.sin(angle))
    return axis * angle
