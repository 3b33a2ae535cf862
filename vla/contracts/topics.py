"""ROS 2 names, frames and the time base of episodes, shared by the ROS nodes, the episode writer
and reader, and the launch files (through the nodes' parameters)."""
from __future__ import annotations

import numpy as np

TOPICS = {
    "image": "/camera/image_raw",
    "wrist_image": "/camera/wrist/image_raw",
    "joint_states": "/joint_states",
    "imu": "/imu/data",
    "instruction": "/vla/instruction",
    "action": "/vla/action",
    "cmd_twist": "/vla/cmd_twist",
    "gripper": "/vla/gripper",
    "episode_info": "/vla/episode_info",  # std_msgs/String, JSON of the episode metadata
}
MSG_TYPES = {
    "image": "sensor_msgs/msg/Image",
    "wrist_image": "sensor_msgs/msg/Image",
    "joint_states": "sensor_msgs/msg/JointState",
    "imu": "sensor_msgs/msg/Imu",
    "instruction": "std_msgs/msg/String",
    "action": "std_msgs/msg/Float32MultiArray",
    "cmd_twist": "geometry_msgs/msg/TwistStamped",
    "gripper": "std_msgs/msg/Float64",
    "episode_info": "std_msgs/msg/String",
}

# ---- frames -------------------------------------------------------------------------------
BASE_FRAME = "panda_link0"  # actions and twists are expressed here
IMU_FRAME = "panda_hand"
CAMERA_FRAME = "scene_camera"
WRIST_CAMERA_FRAME = "wrist_camera"

# ---- time ---------------------------------------------------------------------------------
# Sim time of an episode's first observation (after reset and settling). Observation t is stamped
# EPOCH_NS + t / control_hz; the IMU samples of the first window lie just before EPOCH_NS, which
# keeps every stamp positive. Log time in the bag equals the header stamp.
EPOCH_NS = 1_000_000_000


def step_stamp(step: int, control_hz: int) -> int:
    """Nanoseconds of observation `step` (and of the action chosen from it)."""
    return EPOCH_NS + round(step * 1e9 / control_hz)


def imu_stamps(stamp_ns: int, count: int, imu_hz: int) -> np.ndarray:
    """Stamps of the `count` IMU samples that end at `stamp_ns`, oldest first, 1 / imu_hz apart."""
    return stamp_ns - np.round(np.arange(count - 1, -1, -1) * 1e9 / imu_hz).astype(np.int64)
