"""Simulator settings: one typed dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, fields

from sim.scene import COLOURS


@dataclass(frozen=True)
class SimConfig:
    image_size: int = 96  # scene (and wrist) camera, square, pixels
    wrist_camera: bool = False
    physics_hz: int = 240
    control_hz: int = 10
    imu_hz: int = 120  # must divide physics_hz
    imu_window: int = 12  # samples per observation (default: one control period)
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
        positive = ("image_size", "physics_hz", "control_hz", "imu_hz", "imu_window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SimConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size < 16 or self.image_size > 1024:
            raise ValueError(f"SimConfig.image_size must be in 16..1024, got {self.image_size}")
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

    @classmethod
    def from_dict(cls, values: dict) -> "SimConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown SimConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)
