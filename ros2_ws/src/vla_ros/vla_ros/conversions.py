"""ROS messages <-> the observation and action arrays of vla.contracts.

Message layouts and field conversions are defined once in vla.data.messages (shared with the bag
writer and reader); this module adds what nodes facing real sensors need: strict validation (every
problem is an InputError that the policy node holds on, never an exception that stops it),
compressed images and resizing to the model's input.
"""
from __future__ import annotations

import importlib

import cv2
import numpy as np
from geometry_msgs.msg import TwistStamped
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState
from std_msgs.msg import Float32MultiArray, Float64

from vla.contracts.action import clip_action
from vla.contracts.observation import IMU_CHANNELS, IMU_LIMITS, STATE_DIM, STATE_LIMIT, checked_reading
from vla.data import messages as M
from vla.images import fit_image


class InputError(ValueError):
    """A message the policy cannot use; the text says why (logged and shown in diagnostics)."""


def fill(msg, fields: dict):
    """Set `msg`'s fields from a nested dict as built by vla.data.messages.*_fields(); returns msg."""
    types = msg.get_fields_and_field_types()
    for name, value in fields.items():
        if isinstance(value, dict):
            fill(getattr(msg, name), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):  # sequence of messages
            item_type = message_class(types[name][len("sequence<"):-1])
            setattr(msg, name, [fill(item_type(), item) for item in value])
        elif isinstance(value, np.ndarray) and value.dtype == np.uint8:
            setattr(msg, name, value.tobytes())  # one copy; a numpy array would be set element by element
        else:
            setattr(msg, name, value)
    return msg


def message_class(msgtype: str):
    """The rclpy class of 'pkg/msg/Name' or 'pkg/Name'."""
    package, *_, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def stamp_ns(msg) -> int:
    return M.stamp_from_header(msg.header)


# ---- inputs of the policy ----------------------------------------------------------------------
def image_input(msg: Image, size: int) -> np.ndarray:
    """The model's image from a sensor_msgs/Image of any size in M.IMAGE_ENCODINGS."""
    if msg.encoding.lower() not in M.IMAGE_ENCODINGS:
        raise InputError(f"unsupported encoding {msg.encoding!r} (supported: {', '.join(M.IMAGE_ENCODINGS)})")
    if msg.height == 0 or msg.width == 0 or len(msg.data) != msg.step * msg.height:
        raise InputError(f"inconsistent image: {msg.width}x{msg.height}, step {msg.step}, {len(msg.data)} bytes "
                         f"(expected step x height)")
    try:
        return fit_image(M.image_from_msg(msg), size)
    except ValueError as exc:  # step shorter than a row
        raise InputError(str(exc)) from None


def compressed_input(msg: CompressedImage, size: int) -> np.ndarray:
    """The model's image from a jpeg or png sensor_msgs/CompressedImage (image_transport 'compressed':
    format like 'bgr8; jpeg compressed bgr8'; colour data is always stored as BGR)."""
    fmt = msg.format.lower()
    if not any(kind in fmt for kind in ("jpeg", "jpg", "png")) or "compresseddepth" in fmt:
        raise InputError(f"unsupported compressed format {msg.format!r} (jpeg or png)")
    bgr = cv2.imdecode(np.frombuffer(msg.data, dtype=np.uint8), cv2.IMREAD_COLOR) if len(msg.data) else None
    if bgr is None:
        raise InputError(f"cannot decode {len(msg.data)} bytes of {msg.format!r}")
    return fit_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)


def state_input(msg: JointState) -> np.ndarray:
    """The observation `state` from /joint_states (Panda joints matched by name; others ignored),
    checked as the model's processor checks it (finite, plausible)."""
    if len(msg.position) != len(msg.name):
        raise InputError(f"joint_states has {len(msg.name)} names but {len(msg.position)} positions")
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf positions are reported below
            state = M.state_from_msg(msg)
        return checked_reading("state", state, (STATE_DIM,), STATE_LIMIT)
    except ValueError as exc:  # missing joints, NaN, inf, implausible
        raise InputError(f"joint_states: {exc}") from None


def imu_input(msg: Imu) -> np.ndarray:
    """One (ax, ay, az, gx, gy, gz) sample, finite and plausible."""
    try:
        return checked_reading("imu", M.imu_sample_from_msg(msg), (IMU_CHANNELS,), IMU_LIMITS)
    except ValueError as exc:
        raise InputError(f"IMU sample: {exc}") from None


# ---- commands ------------------------------------------------------------------------------------
def action_messages(action: np.ndarray, rate_hz: float, stamp: int, frame_id: str):
    """(raw action, gripper, twist) for a clamped action; twist = per-step delta * rate_hz."""
    twist = fill(TwistStamped(), M.twist_fields(action, rate_hz, stamp))
    twist.header.frame_id = frame_id
    return fill(Float32MultiArray(), M.action_fields(action)), fill(Float64(), M.gripper_fields(action)), twist


def command_action(twist, gripper: float, rate_hz: float) -> np.ndarray:
    """The action a robot executes for a twist and gripper command, clamped to the limits; a
    non-finite command is an InputError."""
    try:
        return clip_action(M.action_from_twist(twist, gripper, rate_hz))
    except ValueError as exc:
        raise InputError(str(exc)) from None
