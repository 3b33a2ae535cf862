"""Language-conditioned tasks: each builds its scene, names what the instruction must say (its
words: sim.language phrases them) and judges success.

Every task puts objects of other colours beside the one it names, so the instruction matters; with
SimConfig.same_colour, a share of scenes also hold a distractor of the target's colour and another
shape (a bin, in place), so that only the shape tells them apart.
"""
from __future__ import annotations

import numpy as np
import pybullet as p

from sim.config import PUSH_TOLERANCE
from sim.scene import (
    BIN_HEIGHT,
    BIN_INNER_HALF,
    CUBE_HALF,
    SHAPES,
    Scene,
    SceneObject,
    sample_positions,
    shade,
)

TOUCH_DISTANCE = 0.05  # grasp point to an object's centre: reached (success of reach, grounding)
PUSH_DISTANCE = 0.12
# The four directions of a push, as unit vectors in the base frame.
PUSH_DIRECTIONS = {"left": (0.0, 1.0), "right": (0.0, -1.0), "forward": (1.0, 0.0), "back": (-1.0, 0.0)}
LIFTED = 0.02  # metres off the table while held: the "lifted" stage


class Task:
    name: str
    max_steps: int
    # Milestones on the way to success, in order (diagnostics: where a policy fails). Each is judged
    # every step by reached_stages; an episode's stages are those reached at any step.
    stages: tuple[str, ...] = ()

    def __init__(self):
        self.target: SceneObject | None = None
        # What this episode's instruction must say: colour (and shape) of the target, bin_colour
        # (place), direction and place, its plain phrase (push); sim.language phrases them.
        self.words: dict[str, str] = {}

    def build(self, scene: Scene, rng: np.random.Generator, colours, shades: np.random.Generator | None,
              twin: np.random.Generator | None = None) -> None:
        """Add the task's objects to the scene and set self.target and self.words. Objects' colours
        are shaded with `shades`, a stream of their own (None: exact colours). With `twin` (a stream
        of its own, so that the rest of the seed's scene stays), a distractor takes the target's
        colour and another shape."""
        raise NotImplementedError

    def success(self, scene: Scene, ee_position: np.ndarray, gripper_body: int) -> bool:
        raise NotImplementedError

    def reached_stages(self, scene: Scene, ee_position: np.ndarray, gripper_body: int) -> set[str]:
        """The stages whose condition holds now (none for a task without stages: no queries)."""
        if not self.stages:
            return set()
        target = scene.position(self.target)
        return self._holding_stages(scene, target, scene.in_contact(self.target.body, gripper_body), ee_position)

    def _holding_stages(self, scene: Scene, target: np.ndarray, held: bool, ee_position: np.ndarray) -> set[str]:
        """"touched" (grasp point at the target, or contact) and "lifted" (the target off the table
        in the gripper's hold), given the target's position and whether the gripper touches it."""
        now = set()
        if held or np.linalg.norm(target - ee_position) < TOUCH_DISTANCE:
            now.add("touched")
        if held and target[2] > self.target.half_height + LIFTED:
            now.add("lifted")
        return now


def _distinct(rng, colours, n: int) -> list[str]:
    return [colours[i] for i in rng.choice(len(colours), size=n, replace=False)]


def _cubes(scene, rng, shades, positions, chosen: list[str], twin=None) -> list[SceneObject]:
    """Cubes of the `chosen` colours at `positions`, the first the target; with `twin`, the second
    is a ball or cylinder of the target's colour."""
    chosen, shapes = list(chosen), ["cube"] * len(positions)
    if twin is not None:
        chosen[1], shapes[1] = chosen[0], _other_shape("cube", twin)
    return [
        scene.add_object(shape, colour, shade(colour, shades), xy, rng.uniform(-np.pi / 4, np.pi / 4))
        for shape, colour, xy in zip(shapes, chosen, positions)
    ]


def _other_shape(shape: str, twin: np.random.Generator) -> str:
    others = [s for s in SHAPES if s != shape]
    return others[twin.integers(len(others))]


class Reach(Task):
    name, max_steps = "reach", 40

    def build(self, scene, rng, colours, shades, twin=None):
        positions = sample_positions(rng, 3, 0.1)
        objects = []
        for colour, xy in zip(_distinct(rng, colours, 3), positions):
            shape = SHAPES[rng.integers(len(SHAPES))]
            if twin is not None and len(objects) == 1:
                shape, colour = _other_shape(objects[0].shape, twin), objects[0].colour
            objects.append(scene.add_object(shape, colour, shade(colour, shades), xy, rng.uniform(-np.pi, np.pi)))
        self.target = objects[0]
        self.words = {"colour": self.target.colour, "shape": self.target.shape}

    def success(self, scene, ee_position, gripper_body):
        return bool(np.linalg.norm(scene.position(self.target) - ee_position) < TOUCH_DISTANCE)


class Pick(Task):
    name, max_steps = "pick", 60
    stages = ("touched", "lifted")
    LIFT = 0.06

    def build(self, scene, rng, colours, shades, twin=None):
        positions = sample_positions(rng, 3, 0.1)
        self.target = _cubes(scene, rng, shades, positions, _distinct(rng, colours, 3), twin)[0]
        self.words = {"colour": self.target.colour, "shape": "cube"}

    def success(self, scene, ee_position, gripper_body):
        return bool(scene.position(self.target)[2] > CUBE_HALF + self.LIFT)


class Push(Task):
    name, max_steps = "push", 80
    stages = ("halfway",)  # the hand pushes without holding: contact comes and goes within a step

    def __init__(self, tolerance: float = PUSH_TOLERANCE):
        super().__init__()
        self.tolerance = tolerance  # metres from the goal that count as there (SimConfig.push_tolerance)

    def build(self, scene, rng, colours, shades, twin=None):
        while True:
            positions = sample_positions(rng, 3, 0.1)
            direction = list(PUSH_DIRECTIONS)[rng.integers(len(PUSH_DIRECTIONS))]
            unit = np.array(PUSH_DIRECTIONS[direction])
            goal = positions[0] + PUSH_DISTANCE * unit
            behind = positions[0] - 0.06 * unit
            if self._clear(goal, behind, positions[1:]):
                break
        self.goal, self.direction = goal, unit
        self.target = _cubes(scene, rng, shades, positions, _distinct(rng, colours, 3), twin)[0]
        self._add_goal_marker(scene, goal)
        place = "to the " + direction if direction in ("left", "right") else direction
        self.words = {"colour": self.target.colour, "shape": "cube", "direction": direction, "place": place}

    @staticmethod
    def _clear(goal, behind, others) -> bool:
        inside = np.all(goal >= [0.32, -0.3]) and np.all(goal <= [0.74, 0.3]) and behind[0] > 0.3
        return bool(
            inside and all(np.linalg.norm(o - goal) > 0.09 and np.linalg.norm(o - behind) > 0.08 for o in others)
        )

    @staticmethod
    def _add_goal_marker(scene: Scene, goal) -> None:
        vis = p.createVisualShape(
            p.GEOM_CYLINDER, radius=0.03, length=0.001, rgbaColor=(0.95, 0.95, 0.95, 1), physicsClientId=scene.client
        )
        p.createMultiBody(0, -1, vis, basePosition=(goal[0], goal[1], 0.0005), physicsClientId=scene.client)

    def success(self, scene, ee_position, gripper_body):
        return bool(np.linalg.norm(scene.position(self.target)[:2] - self.goal) < self.tolerance)

    def reached_stages(self, scene, ee_position, gripper_body):
        """"halfway": the target at most half the push distance from its goal."""
        halfway = np.linalg.norm(scene.position(self.target)[:2] - self.goal) <= PUSH_DISTANCE / 2
        return {"halfway"} if halfway else set()


class Place(Task):
    name, max_steps = "place", 100
    stages = ("touched", "lifted", "over bin")

    def build(self, scene, rng, colours, shades, twin=None):
        # The region every task uses: the scene camera sees all of it (a wider one put cubes and bins
        # at the image border in 12 % of episodes).
        positions = sample_positions(rng, 5, 0.13)
        bin_colours, cube_colours = _distinct(rng, colours, 2), _distinct(rng, colours, 3)
        # Bins and cubes are coloured apart: a bin shares the cube's colour in 1 of 3 scenes; with
        # `twin`, one bin (either) takes it where none has it.
        if twin is not None and cube_colours[0] not in bin_colours:
            bin_colours[twin.integers(2)] = cube_colours[0]
        bins = [scene.add_bin(colour, shade(colour, shades), xy) for colour, xy in zip(bin_colours, positions[:2])]
        self.target = _cubes(scene, rng, shades, positions[2:], cube_colours)[0]
        self.bin = bins[0]
        self.words = {"colour": self.target.colour, "shape": "cube", "bin_colour": self.bin.colour}

    def success(self, scene, ee_position, gripper_body):
        cube, box = scene.position(self.target), scene.position(self.bin)
        inside = np.all(np.abs(cube[:2] - box[:2]) < BIN_INNER_HALF) and cube[2] < BIN_HEIGHT
        return bool(inside and not scene.in_contact(self.target.body, gripper_body))

    def _holding_stages(self, scene, target, held, ee_position):
        """+ "over bin": the target carried (held) above the named bin's opening."""
        now = super()._holding_stages(scene, target, held, ee_position)
        if held and np.all(np.abs(target[:2] - scene.position(self.bin)[:2]) < BIN_INNER_HALF):
            now.add("over bin")
        return now


TASKS: dict[str, type[Task]] = {t.name: t for t in (Reach, Pick, Push, Place)}


def make_task(name: str, push_tolerance: float = PUSH_TOLERANCE) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return Push(push_tolerance) if name == "push" else TASKS[name]()
