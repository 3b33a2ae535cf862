"""Cameras (PyBullet's CPU TinyRenderer) and a wrist IMU sampled between control steps."""
from __future__ import annotations

from collections import deque

import numpy as np
import pybullet as p

GRAVITY = np.array([0.0, 0.0, -9.81])
SCENE_EYE = np.array([0.80, 0.0, 0.80])
SCENE_TARGET = np.array([0.50, 0.0, 0.02])


class Camera:
    """A pinhole camera rendering uint8 RGB images of size x size."""

    def __init__(self, client: int, size: int, fov: float = 40.0, shadows: bool = False):
        self.client, self.size, self.shadows = client, size, shadows
        self.projection = p.computeProjectionMatrixFOV(fov, 1.0, 0.02, 3.0)
        self.light_direction = (0.4, -0.3, 1.0)
        self.light_colour = (1.0, 1.0, 1.0)
        self.view = None

    def look_at(self, eye, target, up=(0.0, 0.0, 1.0)) -> None:
        self.view = p.computeViewMatrix(list(eye), list(target), list(up))

    def render(self, size: int | None = None) -> np.ndarray:
        size = size or self.size
        _, _, rgba, _, _ = p.getCameraImage(
            size, size, self.view, self.projection, shadow=int(self.shadows),
            lightDirection=self.light_direction, lightColor=self.light_colour,
            renderer=p.ER_TINY_RENDERER, flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.client,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()


def wrist_view(position, quaternion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eye, target and up of a camera on the back of the hand, looking past the fingertips.

    `position` is the grasp point between the fingertips: the eye sits 12 cm behind it (a camera
    there, at the fingertips, clips the table at its near plane and sees white at every grasp) and
    6 cm to the side, so that the fingers frame the bottom of the picture and the object between
    them fills the middle of it.
    """
    rot = np.array(p.getMatrixFromQuaternion(quaternion)).reshape(3, 3)
    grasp = np.asarray(position)
    return grasp + rot @ np.array([0.06, 0.0, -0.12]), grasp + rot @ np.array([0.0, 0.0, 0.04]), rot[:, 0]


class Imu:
    """Specific force and angular rate of a link, in the link frame, with noise and bias.

    Acceleration is the finite difference of the link's world velocity between samples, so it
    reads +9.81 m/s^2 along the world's up axis at rest (an accelerometer measures a - g).
    """

    ACCEL_NOISE, GYRO_NOISE = 0.05, 0.005  # std per sample
    ACCEL_BIAS, GYRO_BIAS = 0.08, 0.01  # std of the per-episode bias

    def __init__(
        self, client: int, body: int, link: int, rate_hz: int, window: int, rng: np.random.Generator, noisy: bool
    ):
        self.client, self.body, self.link, self.dt = client, body, link, 1.0 / rate_hz
        self.rng, self.noisy = rng, noisy
        self.bias = (
            np.concatenate([rng.normal(0, self.ACCEL_BIAS, 3), rng.normal(0, self.GYRO_BIAS, 3)])
            if noisy
            else np.zeros(6)
        )
        self.samples: deque[np.ndarray] = deque(maxlen=window)
        # Every sample since the last take_fresh() (for recorders), bounded to one second's worth.
        self.fresh: deque[np.ndarray] = deque(maxlen=rate_hz)
        self.last_velocity = self._link_velocity()[1]

    def _link_velocity(self):
        s = p.getLinkState(self.body, self.link, computeLinkVelocity=1, physicsClientId=self.client)
        return s[5], np.array(s[6]), np.array(s[7])  # world orientation, linear, angular velocity

    def sample(self) -> None:
        quat, linear, angular = self._link_velocity()
        accel = (linear - self.last_velocity) / self.dt
        self.last_velocity = linear
        world_to_link = np.array(p.getMatrixFromQuaternion(quat)).reshape(3, 3).T
        reading = np.concatenate([world_to_link @ (accel - GRAVITY), world_to_link @ angular]) + self.bias
        if self.noisy:
            reading += self.rng.normal(0, 1, 6) * np.array([self.ACCEL_NOISE] * 3 + [self.GYRO_NOISE] * 3)
        self.samples.append(reading)
        self.fresh.append(reading)

    def take_fresh(self) -> list[np.ndarray]:
        """The samples taken since the previous call (all of them, however long the window)."""
        fresh = list(self.fresh)
        self.fresh.clear()
        return fresh

    def window(self) -> np.ndarray:
        return np.asarray(self.samples, dtype=np.float32)
