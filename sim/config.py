"""Simulator settings: one typed dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim.scene import COLOURS
from vla.config import from_dict
from vla.contracts.observation import CONTROL_HZ, IMAGE_SIZE, IMU_HZ, IMU_WINDOW, ObservationSpec


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
    randomize_lighting: bool = False
    randomize_shades: bool = False  # jitter each colour's RGB a little
    camera_jitter: float = 0.0  # metres of random camera eye/target offset per episode
    colours: tuple[str, ...] = tuple(COLOURS)
    max_steps: int = 0  # 0: the task's own limit

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
        if self.camera_jitter < 0 or self.max_steps < 0:
            raise ValueError("SimConfig.camera_jitter and max_steps must be >= 0")
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
