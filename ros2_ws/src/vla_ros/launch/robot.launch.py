"""policy_node for a real robot, its topics remapped to the robot's drivers.

    ros2 launch vla_ros robot.launch.py camera:=/camera/color/image_raw joint_states:=/franka/joint_states \
        imu:=/wrist_imu/data cmd_twist:=/servo_node/delta_twist_cmds [policy:=/path/to/checkpoint] [device:=cuda]
    ros2 lifecycle set /policy_node activate      # the model is loaded at start; this starts control
    ros2 service call /policy_node/enable std_srvs/srv/SetBool "{data: false}"   # e-stop: zero twist

Parameters come from the package's config/policy_robot.yaml; the arguments override them when given:
policy, device, backend, image_transport (raw | compressed) and the tuning parameters
(`--show-args` lists them; `ros2 param describe /policy_node <name>` explains each): cpu_threads (the
default 1 suits a CPU shared with other processes; 0 takes one thread per core, which busy-waits and
ran ten times slower there), control_rate_hz, trigger, inference (sync | async: the model on a thread
of its own, its action chunks played at the control rate), ensemble_decay, max_input_age,
max_future_stamp, action_rate_hz, autostart, frame_id. MoveIt Servo: the twist is stamped with the camera frame it
answers, so set Servo's incoming_command_timeout above one control period plus the camera-to-command
latency.
"""
from pathlib import Path

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

CONFIG = Path(get_package_share_directory("vla_ros")) / "config"
# Camera images in shared memory (see config/fastdds.xml), unless a Fast DDS profile is set already.
FASTDDS_PROFILE = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", EnvironmentVariable(
    "FASTDDS_DEFAULT_PROFILES_FILE", default_value=str(CONFIG / "fastdds.xml")))
# Launch arguments for policy_node parameters; topics are parameters too (<name>_topic, defaults in
# vla.contracts.topics), so that the robot's own names replace ours without a second table here.
TOPIC_ARGUMENTS = {name: f"{name}_topic" for name in ("camera", "wrist_camera", "joint_states", "imu", "instruction",
                                                     "gripper", "action")} | {"cmd_twist": "twist_topic"}
OVERRIDES = ("policy", "device", "backend", "image_transport")
TUNING = ("cpu_threads", "control_rate_hz", "trigger", "inference", "ensemble_decay", "max_input_age",
          "max_future_stamp", "action_rate_hz", "autostart", "frame_id")
DEFAULTS = yaml.safe_load((CONFIG / "policy_robot.yaml").read_text())["policy_node"]["ros__parameters"]


def typed(name: str, text: str):
    """A launch argument as `-p name:=text` would type it (YAML), a whole number given for a float
    parameter as a float (ROS refuses to set a double parameter to an integer)."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(DEFAULTS.get(name), float) and type(value) is int else value


def nodes(context):
    given = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES + TUNING}
    parameters = {name: typed(name, value) for name, value in given.items() if value}
    for name, parameter in TOPIC_ARGUMENTS.items():
        topic = LaunchConfiguration(name).perform(context)
        if topic:  # image_transport's compressed topic follows: <camera_topic>/compressed
            parameters[parameter] = topic
    return [Node(package="vla_ros", executable="policy_node", name="policy_node", output="screen",
                 parameters=[str(CONFIG / "policy_robot.yaml"), parameters])]


def generate_launch_description():
    arguments = [DeclareLaunchArgument(name, default_value="", description=f"topic of {name} (default: the node's)")
                 for name in TOPIC_ARGUMENTS]
    arguments += [DeclareLaunchArgument(name, default_value="", description="policy_node parameter (default: its YAML)")
                  for name in OVERRIDES]
    arguments += [DeclareLaunchArgument(name, default_value="", description=f"policy_node parameter (default: "
                                        f"{DEFAULTS[name]!r}, from policy_robot.yaml)") for name in TUNING]
    return LaunchDescription(arguments + [FASTDDS_PROFILE, OpaqueFunction(function=nodes)])
