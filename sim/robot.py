"""The Franka Panda: loading, end-effector delta control through IK, proprioception."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pybullet as p

from vla.contracts.action import WORKSPACE_HIGH, WORKSPACE_LOW
from vla.contracts.kinematics import state_from_joints

# Visual meshes are the stock collision meshes (~3.4k triangles in all instead of ~100k):
# the CPU renderer's cost is dominated by triangles at small image sizes.
URDF = Path(__file__).parent / "assets" / "panda" / "panda.urdf"
ARM_JOINTS = list(range(7))
FINGER_JOINTS = [9, 10]
HAND_LINK = 8  # where the IMU and the wrist camera sit
EE_LINK = 11  # panda_grasptarget: between the fingertips
HOME = [0.0, -0.35, 0.0, -2.45, 0.0, 2.1, 0.785]
LOWER = [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973]
UPPER = [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973]
RANGES = [u - lo for u, lo in zip(UPPER, LOWER)]
ARM_FORCES = [87.0] * 4 + [12.0] * 3
FINGER_FORCE = 40.0
MAX_FINGER = 0.04  # per finger, metres


class Panda:
    def __init__(self, client: int):
        self.client = client
        self.body = p.loadURDF(
            str(URDF), useFixedBase=True, flags=p.URDF_ENABLE_CACHED_GRAPHICS_SHAPES, physicsClientId=client
        )
        for j, q in zip(ARM_JOINTS, HOME):
            p.resetJointState(self.body, j, q, physicsClientId=client)
        for j in FINGER_JOINTS:
            p.resetJointState(self.body, j, MAX_FINGER, physicsClientId=client)
        for link in (8, 9, 10):
            p.changeVisualShape(self.body, link, rgbaColor=(0.25, 0.25, 0.27, 1), physicsClientId=client)
        for j in FINGER_JOINTS:
            p.changeDynamics(self.body, j, lateralFriction=1.5, spinningFriction=0.01, physicsClientId=client)
        self.arm_targets = list(HOME)
        self.finger_target = MAX_FINGER
        self.apply_targets()

    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        state = p.getLinkState(self.body, EE_LINK, computeForwardKinematics=1, physicsClientId=self.client)
        return np.array(state[4]), np.array(state[5])

    def joint_positions(self) -> tuple[list[float], list[float]]:
        q = self.joint_states()[0]
        return q[:7], q[7:]

    def joint_states(self) -> tuple[list[float], list[float]]:
        """Positions and velocities of the 7 arm and 2 finger joints, as /joint_states carries them."""
        states = p.getJointStates(self.body, ARM_JOINTS + FINGER_JOINTS, physicsClientId=self.client)
        return [s[0] for s in states], [s[1] for s in states]

    def state(self) -> np.ndarray:
        """The observation `state`, computed from joint positions exactly as from /joint_states."""
        return state_from_joints(*self.joint_positions())

    def command(self, action: np.ndarray) -> None:
        """Set joint targets for an end-effector delta (base frame) and a gripper opening in [0, 1]."""
        pos, quat = self.ee_pose()
        target = np.clip(pos + action[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        delta = p.getQuaternionFromEuler(action[3:6].tolist())
        _, target_quat = p.multiplyTransforms((0, 0, 0), delta, (0, 0, 0), quat)
        self.arm_targets = self._inverse_kinematics(target, target_quat)
        self.finger_target = float(action[6]) * MAX_FINGER
        self.apply_targets()

    def reset_to(self, position, yaw: float) -> None:
        """Place the arm (no motion) with the grasp point at `position`, pointing down, turned by
        `yaw`: the start pose of an episode."""
        quat = p.getQuaternionFromEuler((np.pi, 0.0, yaw))
        for _ in range(3):  # IK from the current joints; a few rounds converge from HOME
            q = self._inverse_kinematics(np.asarray(position), quat, iterations=50)
            for j, value in zip(ARM_JOINTS, q):
                p.resetJointState(self.body, j, value, physicsClientId=self.client)
        self.arm_targets = q
        self.apply_targets()

    def _inverse_kinematics(self, position: np.ndarray, quat, iterations: int = 20) -> list[float]:
        q = p.calculateInverseKinematics(
            self.body,
            EE_LINK,
            position.tolist(),
            quat,
            lowerLimits=LOWER + [0, 0],
            upperLimits=UPPER + [MAX_FINGER] * 2,
            jointRanges=RANGES + [MAX_FINGER] * 2,
            restPoses=HOME + [self.finger_target] * 2,
            maxNumIterations=iterations,
            residualThreshold=1e-4,
            physicsClientId=self.client,
        )
        return list(q[:7])

    def apply_targets(self) -> None:
        p.setJointMotorControlArray(
            self.body,
            ARM_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=self.arm_targets,
            forces=ARM_FORCES,
            physicsClientId=self.client,
        )
        p.setJointMotorControlArray(
            self.body,
            FINGER_JOINTS,
            p.POSITION_CONTROL,
            targetPositions=[self.finger_target] * 2,
            forces=[FINGER_FORCE] * 2,
            physicsClientId=self.client,
        )
