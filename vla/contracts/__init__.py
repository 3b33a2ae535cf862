"""The contracts everyone stands on: observation, action and limits, the state's kinematics, ROS
topic names and frames. numpy only (importing them never imports a simulator, torch or ROS)."""
from vla.contracts.action import (
    ACTION_DIM,
    ACTION_HIGH,
    ACTION_LOW,
    ACTION_NAMES,
    MAX_ROTATION,
    MAX_TRANSLATION,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    clip_action,
)
from vla.contracts.kinematics import state_from_joints
from vla.contracts.observation import (
    ARM_JOINT_NAMES,
    CONTROL_HZ,
    FINGER_JOINT_NAMES,
    IMAGE_SIZE,
    IMU_CHANNELS,
    IMU_HZ,
    IMU_WINDOW,
    INSTRUCTION_CHARSET,
    INSTRUCTION_MAX_LENGTH,
    JOINT_NAMES,
    STATE_DIM,
    STATE_LAYOUT,
    STATE_SLICES,
    ObservationSpec,
)

__all__ = [
    "ACTION_DIM", "ACTION_HIGH", "ACTION_LOW", "ACTION_NAMES", "ARM_JOINT_NAMES", "CONTROL_HZ", "FINGER_JOINT_NAMES",
    "IMAGE_SIZE", "IMU_CHANNELS", "IMU_HZ", "IMU_WINDOW", "INSTRUCTION_CHARSET", "INSTRUCTION_MAX_LENGTH",
    "JOINT_NAMES", "MAX_ROTATION", "MAX_TRANSLATION", "STATE_DIM", "STATE_LAYOUT", "STATE_SLICES", "WORKSPACE_HIGH",
    "WORKSPACE_LOW", "ObservationSpec", "clip_action", "state_from_joints",
]
