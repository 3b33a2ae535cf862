"""ROS 2 messages without ROS: observation and action arrays <-> message fields <-> CDR bytes.

`*_fields()` return nested dicts with every field of the message (`build` turns them into rosbags
message objects, `vla_ros.conversions.fill` into rclpy ones); `*_from_msg()` read any object with
the message's attributes (rclpy or rosbags). Shared by the episode writer and reader and the ROS
nodes, so that one definition serves all. No rclpy here.
"""
from __future__ import annotations

import cv2
import numpy as np
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.base import Nodetype

from vla.contracts.action import ACTION_DIM
from vla.contracts.kinematics import state_from_joints
from vla.contracts.observation import JOINT_NAMES, MAX_IMAGE_SIDE
from vla.contracts.topics import BASE_FRAME, CAMERA_FRAME, IMU_FRAME

# ---- CDR -----------------------------------------------------------------------------------------
# Standard message definitions are the same in every ROS 2 distribution since Humble.
TYPESTORE = get_typestore(Stores.ROS2_JAZZY)

_NUMPY = {"bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
          "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
          "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64}


def build(msgtype: str, fields: dict, typestore=TYPESTORE):
    """The message object of type `msgtype` from a dict holding every one of its fields."""
    kwargs = {}
    for name, (nodetype, detail) in typestore.fielddefs[msgtype][1]:
        if name not in fields:
            raise KeyError(f"{msgtype}: field {name!r} missing")
        value = fields[name]
        if nodetype == Nodetype.NAME:
            value = build(detail, value, typestore)
        elif nodetype in (Nodetype.ARRAY, Nodetype.SEQUENCE):
            item_type, item_detail = detail[0]
            if item_type == Nodetype.NAME:
                value = [build(item_detail, item, typestore) for item in value]
            elif item_detail[0] != "string":
                value = np.asarray(value, dtype=_NUMPY[item_detail[0]])
        kwargs[name] = value
    return typestore.types[msgtype](**kwargs)


def serialize(msgtype: str, fields: dict) -> memoryview:
    return TYPESTORE.serialize_cdr(build(msgtype, fields), msgtype)


# ---- headers -------------------------------------------------------------------------------------
def header(stamp_ns: int, frame_id: str) -> dict:
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": frame_id}


def stamp_from_header(msg_header) -> int:
    return msg_header.stamp.sec * 1_000_000_000 + msg_header.stamp.nanosec


# ---- message fields from observations and actions ----------------------------------------------
def image_fields(image: np.ndarray, stamp_ns: int, frame_id: str = CAMERA_FRAME) -> dict:
    height, width = image.shape[:2]
    return {
        "header": header(stamp_ns, frame_id), "height": height, "width": width, "encoding": "rgb8",
        "is_bigendian": 0, "step": 3 * width, "data": np.ascontiguousarray(image, dtype=np.uint8).reshape(-1),
    }


def joint_state_fields(positions, velocities, stamp_ns: int) -> dict:
    return {
        "header": header(stamp_ns, ""), "name": list(JOINT_NAMES),
        "position": np.asarray(positions, dtype=np.float64), "velocity": np.asarray(velocities, dtype=np.float64),
        "effort": np.zeros(0, dtype=np.float64),
    }


def imu_fields(sample, stamp_ns: int) -> dict:
    """One IMU sample (ax, ay, az, gx, gy, gz). No orientation estimate: covariance[0] = -1 (REP-145)."""
    a, g = np.asarray(sample, dtype=np.float64)[:3], np.asarray(sample, dtype=np.float64)[3:6]
    no_orientation = np.zeros(9)
    no_orientation[0] = -1.0
    return {
        "header": header(stamp_ns, IMU_FRAME),
        "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}, "orientation_covariance": no_orientation,
        "angular_velocity": _vector(g), "angular_velocity_covariance": np.zeros(9),
        "linear_acceleration": _vector(a), "linear_acceleration_covariance": np.zeros(9),
    }


def string_fields(text: str) -> dict:
    return {"data": text}


def action_fields(action) -> dict:
    """The raw 7-D action as std_msgs/Float32MultiArray."""
    return {
        "layout": {"dim": [{"label": "action", "size": ACTION_DIM, "stride": ACTION_DIM}], "data_offset": 0},
        "data": np.asarray(action, dtype=np.float32).reshape(ACTION_DIM),
    }


def twist_fields(action, control_hz: float, stamp_ns: int) -> dict:
    """End-effector velocity = per-step delta / control period, in the base frame."""
    a = np.asarray(action, dtype=np.float64)
    return {
        "header": header(stamp_ns, BASE_FRAME),
        "twist": {"linear": _vector(a[:3] * control_hz), "angular": _vector(a[3:6] * control_hz)},
    }


def gripper_fields(action) -> dict:
    return {"data": float(action[6])}


def _vector(xyz) -> dict:
    return {"x": float(xyz[0]), "y": float(xyz[1]), "z": float(xyz[2])}


# ---- observations and actions from messages ------------------------------------------------
# Encodings a camera may send (REP-104 / sensor_msgs image_encodings) -> OpenCV conversion to RGB.
_TO_RGB = {"rgb8": None, "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
           "mono8": cv2.COLOR_GRAY2RGB}
_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
IMAGE_ENCODINGS = tuple(_TO_RGB)
def image_from_msg(msg) -> np.ndarray:
    """uint8 H x W x 3 RGB from a sensor_msgs/Image; ValueError for encodings other than IMAGE_ENCODINGS,
    an empty or absurd size, or too little data."""
    encoding = msg.encoding.lower()
    if encoding not in _TO_RGB:
        raise ValueError(f"unsupported image encoding {msg.encoding!r} (supported: {', '.join(IMAGE_ENCODINGS)})")
    if not (0 < msg.height <= MAX_IMAGE_SIDE and 0 < msg.width <= MAX_IMAGE_SIDE):
        raise ValueError(f"unusable image size {msg.width}x{msg.height}")
    channels = _CHANNELS[encoding]
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if msg.step < msg.width * channels or len(data) < msg.step * msg.height:
        raise ValueError(f"image data too short for {msg.width}x{msg.height} {msg.encoding} "
                         f"(step {msg.step}, {len(data)} bytes)")
    rows = data[: msg.step * msg.height].reshape(msg.height, msg.step)[:, : msg.width * channels]
    image = rows.reshape(msg.height, msg.width, channels)
    code = _TO_RGB[encoding]
    return np.ascontiguousarray(image if code is None else cv2.cvtColor(image, code))


def state_from_msg(msg) -> np.ndarray:
    """The observation `state` from a sensor_msgs/JointState (joints matched by name, any order)."""
    index = {name: i for i, name in enumerate(msg.name)}
    missing = [name for name in JOINT_NAMES if name not in index]
    if missing:
        raise ValueError(f"joint_states lacks joints {missing}")
    positions = np.asarray(msg.position, dtype=np.float64)[[index[name] for name in JOINT_NAMES]]
    return state_from_joints(positions[:7], positions[7:])


def imu_sample_from_msg(msg) -> np.ndarray:
    a, g = msg.linear_acceleration, msg.angular_velocity
    return np.array([a.x, a.y, a.z, g.x, g.y, g.z], dtype=np.float64)


def action_from_msg(msg) -> np.ndarray:
    data = np.asarray(msg.data, dtype=np.float32)
    if data.shape != (ACTION_DIM,):
        raise ValueError(f"action message has {data.size} values, expected {ACTION_DIM}")
    return data


def twist_vector(twist_msg) -> np.ndarray:
    """(vx, vy, vz, wx, wy, wz) of a TwistStamped."""
    lin, ang = twist_msg.twist.linear, twist_msg.twist.angular
    return np.array([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z])


def action_from_twist(twist_msg, gripper: float, control_hz: float) -> np.ndarray:
    """Inverse of twist_fields + gripper_fields: the 7-D action from a TwistStamped and a gripper value."""
    return np.append(twist_vector(twist_msg) / control_hz, gripper).astype(np.float32)
