"""The tabletop: a table, coloured objects and bins built from primitives (a few triangles each)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.65, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.18, 0.75),
    "orange": (1.00, 0.50, 0.05),
}
SHAPES = ("cube", "ball", "cylinder")
CUBE_HALF = 0.02  # 4 cm cubes
BALL_RADIUS = 0.025
CYLINDER_RADIUS, CYLINDER_HALF = 0.02, 0.03
BIN_INNER_HALF, BIN_WALL, BIN_HEIGHT = 0.06, 0.01, 0.04
TABLE_RGBA = (0.62, 0.50, 0.38, 1.0)
SHADE_JITTER = 0.08  # per RGB channel, with SimConfig.randomize_shades
# Objects are placed in this region of the table (base frame, metres).
OBJECT_REGION_LOW = np.array([0.38, -0.22])
OBJECT_REGION_HIGH = np.array([0.68, 0.22])


@dataclass
class SceneObject:
    body: int
    shape: str  # "cube", "ball", "cylinder" or "bin"
    colour: str
    half_height: float  # resting centre height above the table

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


class Scene:
    """Builds and queries the objects of one episode in one PyBullet client."""

    def __init__(self, client: int):
        self.client = client
        self.objects: list[SceneObject] = []

    def build_table(self) -> int:
        half = (0.75, 0.6, 0.025)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=self.client)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=TABLE_RGBA, physicsClientId=self.client)
        return p.createMultiBody(0, col, vis, basePosition=(0.45, 0, -half[2]), physicsClientId=self.client)

    def add_object(self, shape: str, colour: str, rgb, xy, yaw: float) -> SceneObject:
        c = self.client
        rgba = (*rgb, 1.0)
        if shape == "cube":
            half = [CUBE_HALF] * 3
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=c)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=rgba, physicsClientId=c)
            z, mass = CUBE_HALF, 0.05
        elif shape == "ball":
            col = p.createCollisionShape(p.GEOM_SPHERE, radius=BALL_RADIUS, physicsClientId=c)
            vis = p.createVisualShape(p.GEOM_SPHERE, radius=BALL_RADIUS, rgbaColor=rgba, physicsClientId=c)
            z, mass = BALL_RADIUS, 0.05
        elif shape == "cylinder":
            h = 2 * CYLINDER_HALF
            col = p.createCollisionShape(p.GEOM_CYLINDER, radius=CYLINDER_RADIUS, height=h, physicsClientId=c)
            vis = p.createVisualShape(
                p.GEOM_CYLINDER, radius=CYLINDER_RADIUS, length=h, rgbaColor=rgba, physicsClientId=c
            )
            z, mass = CYLINDER_HALF, 0.05
        else:
            raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
        orn = p.getQuaternionFromEuler((0, 0, yaw))
        body = p.createMultiBody(mass, col, vis, basePosition=(xy[0], xy[1], z), baseOrientation=orn, physicsClientId=c)
        p.changeDynamics(
            body,
            -1,
            lateralFriction=1.0,
            spinningFriction=0.001,
            rollingFriction=0.0005 if shape == "ball" else 0.0,
            physicsClientId=c,
        )
        obj = SceneObject(body, shape, colour, z)
        self.objects.append(obj)
        return obj

    def add_bin(self, colour: str, rgb, xy) -> SceneObject:
        """An open box, static: a floor and four walls in one body."""
        c, inner, t, h = self.client, BIN_INNER_HALF, BIN_WALL, BIN_HEIGHT
        parts = [  # (half extents, centre)
            ((inner + t, inner + t, t / 2), (0, 0, t / 2)),
            ((t / 2, inner + t, h / 2), (inner + t / 2, 0, h / 2)),
            ((t / 2, inner + t, h / 2), (-inner - t / 2, 0, h / 2)),
            ((inner, t / 2, h / 2), (0, inner + t / 2, h / 2)),
            ((inner, t / 2, h / 2), (0, -inner - t / 2, h / 2)),
        ]
        halves = [list(hx) for hx, _ in parts]
        centres = [list(cx) for _, cx in parts]
        n = len(parts)
        col = p.createCollisionShapeArray(
            [p.GEOM_BOX] * n, halfExtents=halves, collisionFramePositions=centres, physicsClientId=c
        )
        vis = p.createVisualShapeArray(
            [p.GEOM_BOX] * n,
            halfExtents=halves,
            visualFramePositions=centres,
            rgbaColors=[(*rgb, 1.0)] * n,
            physicsClientId=c,
        )
        body = p.createMultiBody(0, col, vis, basePosition=(xy[0], xy[1], 0), physicsClientId=c)
        obj = SceneObject(body, "bin", colour, 0.0)
        self.objects.append(obj)
        return obj

    def position(self, obj: SceneObject) -> np.ndarray:
        return np.array(p.getBasePositionAndOrientation(obj.body, physicsClientId=self.client)[0])

    def yaw(self, obj: SceneObject) -> float:
        quat = p.getBasePositionAndOrientation(obj.body, physicsClientId=self.client)[1]
        return p.getEulerFromQuaternion(quat)[2]

    def in_contact(self, a: int, b: int) -> bool:
        return len(p.getContactPoints(a, b, physicsClientId=self.client)) > 0


def sample_positions(
    rng: np.random.Generator, n: int, min_distance: float, low=OBJECT_REGION_LOW, high=OBJECT_REGION_HIGH
) -> list[np.ndarray]:
    """n points in the region at least min_distance apart (rejection sampling, restarts if stuck)."""
    for _ in range(100):
        points: list[np.ndarray] = []
        for _ in range(200):
            xy = rng.uniform(low, high)
            if all(np.linalg.norm(xy - q) >= min_distance for q in points):
                points.append(xy)
                if len(points) == n:
                    return points
    raise RuntimeError(f"cannot place {n} objects {min_distance} m apart in the object region")


def shade(colour: str, rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """The colour's RGB, each channel moved by up to +-SHADE_JITTER with `rng` (None: exact)."""
    rgb = np.array(COLOURS[colour])
    if rng is not None:
        rgb = np.clip(rgb + rng.uniform(-SHADE_JITTER, SHADE_JITTER, 3), 0, 1)
    return tuple(float(v) for v in rgb)
