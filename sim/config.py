"""Simulator settings: one typed dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sim.language import SPLITS
from sim.scene import COLOURS
from vla.config import from_dict
from vla.contracts.observation import CONTROL_HZ, IMAGE_SIZE, IMU_HZ, IMU_WINDOW, ObservationSpec

CAMERA_JITTER = 0.02  # metres: the camera jitter that the randomisation name "jitter" turns on
MAX_CAMERA_JITTER = 0.1  # metres: at this the picture moves by ~20 of 96 pixels, objects leave it
DISTURBANCE = 0.02  # metres: the pushes that the randomisation name "disturbance" turns on
MAX_DISTURBANCE = 0.05  # metres: the most the hand moves in a control step (MAX_TRANSLATION)
DISTURBANCE_SHARE = 0.2  # of the control steps that get a push
SAME_COLOUR = 0.5  # the share of scenes that the randomisation name "same_colour" gives a twin
PUSH_TOLERANCE = 0.04  # metres: a push succeeds with the cube this near its goal (the marker's radius is 3 cm)
MAX_PUSH_TOLERANCE = 0.06  # metres: half the push distance; more would count a half-done push
# names of the domain-randomisation switches; `all` turns on the visual ones
VISUAL_RANDOMIZATIONS = ("lighting", "shades", "jitter")
RANDOMIZATIONS = (*VISUAL_RANDOMIZATIONS, "disturbance", "same_colour")
# name: (SimConfig field, value the bare name sets, largest value, unit)
MAGNITUDES = {"jitter": ("camera_jitter", CAMERA_JITTER, MAX_CAMERA_JITTER, "metres"),
              "disturbance": ("disturbance", DISTURBANCE, MAX_DISTURBANCE, "metres"),
              "same_colour": ("same_colour", SAME_COLOUR, 1.0, "(a share of scenes)")}


@dataclass(frozen=True)
class SimConfig:
    image_size: int = IMAGE_SIZE  # scene (and wrist) camera, square, pixels
    wrist_camera: bool = False
    physics_hz: int = 240
    control_hz: int = CONTROL_HZ
    imu_hz: int = IMU_HZ  # must divide physics_hz
    imu_window: int = IMU_WINDOW  # samples per observation (default: one control period)
    imu_noise: bool = True  # white noise and a per-episode bias
    gui: bool = False  # PyBullet GUI window instead of DIRECT
    shadows: bool = False
    randomize_start: bool = True  # start each episode from a random arm pose
    randomize_lighting: bool = False  # light direction and colour per episode
    randomize_shades: bool = False  # each object's RGB moved by up to +-0.08 per channel
    # Per episode, each coordinate of the scene camera's eye and of the point it looks at moves by
    # a uniform offset in [-camera_jitter, camera_jitter] metres (0: a fixed camera; at most
    # MAX_CAMERA_JITTER). The eye is 0.84 m from that point: 0.02 m (CAMERA_JITTER, what `jitter`
    # turns on) shifts a 96 x 96 image by 3 pixels on average, 7 at most.
    camera_jitter: float = 0.0
    # Pushes (DART, Laskey et al. 2017): in DISTURBANCE_SHARE of the control steps the hand's commanded
    # motion gets a push, normal with this std in metres along each horizontal axis, so that the
    # scripted expert's demonstrations hold its corrections (and its retries after an empty grasp).
    # The action recorded and returned in info["action"] stays the command; 0: none.
    disturbance: float = 0.0
    # The share of scenes in which a distractor takes the target's colour and another shape (a ball
    # or cylinder beside a cube; in place, a bin of the cube's colour where neither has it), so that
    # only the shape tells them apart; drawn from a stream of its own: the rest of the scene stays.
    same_colour: float = 0.0
    colours: tuple[str, ...] = tuple(COLOURS)
    max_steps: int = 0  # 0: the task's own limit
    # A push's success radius around its goal. Evaluation keeps PUSH_TOLERANCE; demonstrations recorded
    # with less push on into the ring instead of stopping at its edge (2 cm: fewer near misses, no more
    # successes in one run; docs/all-tasks-cpu.md).
    push_tolerance: float = PUSH_TOLERANCE
    # Which phrasings instructions are drawn from (sim.language): "train" for data and training,
    # "heldout" for evaluating how a policy follows requests put in ways it was never trained on.
    phrasing: str = "train"

    def __post_init__(self):
        ObservationSpec(self.image_size, self.imu_window, self.wrist_camera)  # the same checks
        for name in ("physics_hz", "control_hz", "imu_hz"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SimConfig.{name} must be a positive integer, got {value!r}")
        if self.physics_hz % self.control_hz:
            raise ValueError(
                f"SimConfig.control_hz ({self.control_hz}) must divide physics_hz ({self.physics_hz})"
            )
        if self.physics_hz % self.imu_hz or self.imu_hz < self.control_hz:
            raise ValueError(
                f"SimConfig.imu_hz ({self.imu_hz}) must divide physics_hz ({self.physics_hz}) "
                f"and be at least control_hz ({self.control_hz})"
            )
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown colour(s) {unknown}; choose from {sorted(COLOURS)}")
        if len(set(self.colours)) < 3:
            raise ValueError("SimConfig.colours needs at least 3 distinct colours (tasks use distractors)")
        if self.phrasing not in SPLITS:
            raise ValueError(f"SimConfig.phrasing must be one of {SPLITS}, got {self.phrasing!r}")
        for key, _, most, unit in MAGNITUDES.values():
            value = getattr(self, key)
            if not 0 <= value <= most:
                raise ValueError(f"SimConfig.{key} must be in [0, {most}] {unit}, got {value!r}")
        if self.max_steps < 0:
            raise ValueError(f"SimConfig.max_steps must be >= 0, got {self.max_steps!r}")
        if not 0 < self.push_tolerance <= MAX_PUSH_TOLERANCE:
            raise ValueError(f"SimConfig.push_tolerance must be in (0, {MAX_PUSH_TOLERANCE}] metres, "
                             f"got {self.push_tolerance!r}")
        object.__setattr__(self, "colours", tuple(self.colours))

    @property
    def substeps(self) -> int:
        return self.physics_hz // self.control_hz

    @property
    def spec(self) -> ObservationSpec:
        """What the observations hold."""
        return ObservationSpec(self.image_size, self.imu_window, self.wrist_camera)

    @classmethod
    def for_spec(cls, spec: ObservationSpec, **settings) -> SimConfig:
        """A simulator giving the observations of `spec` (a policy's), with other `settings`."""
        return cls(**dataclasses.asdict(spec), **settings)

    @classmethod
    def from_dict(cls, values: dict, where: str = "SimConfig") -> SimConfig:
        """From a mapping (YAML, JSON), with one-line errors for unknown or ill-typed keys."""
        return from_dict(cls, values, where)


def randomization(spec: str) -> dict:
    """SimConfig settings for comma-separated randomisation names: `lighting`, `shades`, `jitter`
    (CAMERA_JITTER metres) or `jitter=METRES`, `disturbance` (DISTURBANCE metres) or
    `disturbance=METRES`, `same_colour` (SAME_COLOUR of the scenes) or `same_colour=SHARE`; `all`
    for every visual one, `none` or "" for none.
    `SimConfig(**randomization("lighting,jitter=0.03"))`."""
    switches = {
        "lighting": {"randomize_lighting": True},
        "shades": {"randomize_shades": True},
        **{name: {key: default} for name, (key, default, *_) in MAGNITUDES.items()},
    }
    settings: dict = {}
    for item in (part.strip() for part in spec.split(",")):
        name, sep, value = item.partition("=")
        if name in MAGNITUDES and sep:
            key, default, most, unit = MAGNITUDES[name]
            try:
                amount = float(value)
            except ValueError:
                amount = math.nan
            if not 0 <= amount <= most:
                raise ValueError(f"{item!r}: expected 0 to {most} {unit}, e.g. {name}={default}")
            settings[key] = amount
        elif not sep and name in (*switches, "all"):
            for switch in VISUAL_RANDOMIZATIONS if name == "all" else (name,):
                for key, default in switches[switch].items():
                    settings.setdefault(key, default)  # an explicit jitter=METRES stays
        elif sep or name not in ("", "none"):
            raise ValueError(f"unknown randomisation {item!r}; choose from {', '.join(RANDOMIZATIONS)} "
                             "(jitter=METRES, disturbance=METRES, same_colour=SHARE for another amount), all or none")
    return settings
