"""The observation contract: what every observation holds, in sim, episodes, policies and ROS.

An observation is a dict:
    image        uint8 [S, S, 3] RGB from the scene camera (S = ObservationSpec.image_size)
    wrist_image  uint8 [S, S, 3] RGB from the camera on the hand (only with wrist_camera)
    state        float32 [STATE_DIM], laid out as STATE_LAYOUT (a function of joint positions:
                 vla.contracts.kinematics.state_from_joints)
    imu          float32 [W, IMU_CHANNELS], the last W IMU samples, oldest first
    instruction  str
Frames follow REP-103: metres, radians; the robot base frame has x forward, y left, z up; the
table top is the plane z = 0 and the robot base sits at the origin.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

# ---- proprioceptive state -------------------------------------------------------------------
GRIPPER_WIDTH_MAX = 0.08  # metres between the Panda's fingers, fully open
STATE_LAYOUT = (
    ("joint_positions", 7),  # Panda joints 1..7 [rad]
    ("gripper_width", 1),  # distance between the fingers [m], 0 .. GRIPPER_WIDTH_MAX
    ("ee_position", 3),  # grasp point between the fingertips, base frame [m]
    ("ee_quaternion", 4),  # its orientation, base frame, (x, y, z, w)
)
STATE_DIM = sum(n for _, n in STATE_LAYOUT)
STATE_SLICES: dict[str, slice] = {}
_start = 0
for _name, _n in STATE_LAYOUT:
    STATE_SLICES[_name] = slice(_start, _start + _n)
    _start += _n
ARM_JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))
FINGER_JOINT_NAMES = ("panda_finger_joint1", "panda_finger_joint2")
JOINT_NAMES = ARM_JOINT_NAMES + FINGER_JOINT_NAMES

# ---- IMU ------------------------------------------------------------------------------------
# (ax, ay, az) specific force in m/s^2 (gravity included: +9.81 on the up axis at rest) and
# (gx, gy, gz) angular rate in rad/s, in the frame of the IMU on the Panda hand.
IMU_CHANNELS = 6

# ---- plausible readings: beyond these a sensor or driver is broken, never an input to act on ----
STATE_LIMIT = 10.0  # |any state value| [rad, m]: a Panda's joints stay within +-3.8 rad, its hand within 1.2 m
IMU_LIMITS = np.array([500.0] * 3 + [100.0] * 3)  # |specific force| [m/s^2] (~50 g), |angular rate| [rad/s]
MAX_IMAGE_SIDE = 8192  # pixels: larger "images" are broken messages, not cameras

# ---- rates and sizes (defaults everywhere: sim, model, recorder, ROS nodes) ------------------
IMAGE_SIZE = 96  # square camera images, pixels
IMU_WINDOW = 12  # IMU samples per observation: one control period at the default rates
CONTROL_HZ = 10
IMU_HZ = 120

# ---- instruction ----------------------------------------------------------------------------
INSTRUCTION_MAX_LENGTH = 256  # characters
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-!?"


@dataclass(frozen=True)
class ObservationSpec:
    """What a policy's observations hold: the model's inputs, and what a simulator or robot must
    give it."""

    image_size: int = IMAGE_SIZE
    imu_window: int = IMU_WINDOW
    wrist_camera: bool = False

    def __post_init__(self):
        for name in ("image_size", "imu_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 16..1024, got {self.image_size}")
        if self.imu_window > 1000:
            raise ValueError(f"imu_window must be at most 1000 samples, got {self.imu_window}")


def checked_reading(name: str, value, shape: tuple[int, ...], limit) -> np.ndarray:
    """`value` as float32 of `shape`, finite and within +-limit (per last-axis channel); else a
    ValueError naming the observation key and the problem. Only real numbers count: numpy would
    also read numeric strings and drop imaginary parts."""
    try:
        kind = np.asarray(value).dtype.kind
    except (TypeError, ValueError):  # e.g. ragged nested lists
        kind = "O"
    if kind not in "iuf":
        raise ValueError(f"observation {name!r} is not numeric: {type(value).__name__} "
                         f"{getattr(value, 'dtype', '')}".strip())
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"observation {name!r} must have shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"observation {name!r} contains NaN or inf")
    outside = np.abs(array) > limit
    if outside.any():
        worst = float(np.abs(array).max())
        raise ValueError(f"observation {name!r} has an implausible value ({worst:.3g}; limit {np.max(limit):g})")
    return array.astype(np.float32)
