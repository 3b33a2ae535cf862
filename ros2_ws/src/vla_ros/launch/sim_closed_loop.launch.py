"""The closed loop in simulation over ROS 2: sim_node + policy_node, and recorder_node with record:=true.

    ros2 launch vla_ros sim_closed_loop.launch.py [policy:=random] [device:=cuda] [backend:=onnx]
        [trigger:=timer inference:=async] [task:=pick] [record:=true] [output_dir:=datasets/ros]

Parameters come from the package's config/sim.yaml, policy_sim.yaml and recorder.yaml; the arguments
above override them when given.
"""
from pathlib import Path

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

CONFIG = Path(get_package_share_directory("vla_ros")) / "config"
# Camera images in shared memory (see config/fastdds.xml), unless a Fast DDS profile is set already.
FASTDDS_PROFILE = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", EnvironmentVariable(
    "FASTDDS_DEFAULT_PROFILES_FILE", default_value=str(CONFIG / "fastdds.xml")))
OVERRIDES = {"policy": "policy_node", "device": "policy_node", "backend": "policy_node", "trigger": "policy_node",
             "inference": "policy_node", "task": "sim_node", "output_dir": "recorder_node"}


def overrides(context, node: str) -> dict:
    """The launch arguments given for `node`, typed as YAML (as `-p name:=value` would be)."""
    values = {name: LaunchConfiguration(name).perform(context) for name, owner in OVERRIDES.items() if owner == node}
    return {name: yaml.safe_load(value) for name, value in values.items() if value}


def nodes(context):
    return [
        Node(
            package="vla_ros",
            executable="sim_node",
            name="sim_node",
            output="screen",
            parameters=[str(CONFIG / "sim.yaml"), overrides(context, "sim_node")],
        ),
        Node(
            package="vla_ros",
            executable="policy_node",
            name="policy_node",
            output="screen",
            parameters=[str(CONFIG / "policy_sim.yaml"), overrides(context, "policy_node")],
        ),
        Node(
            package="vla_ros",
            executable="recorder_node",
            name="recorder_node",
            output="screen",
            condition=IfCondition(LaunchConfiguration("record")),
            parameters=[str(CONFIG / "recorder.yaml"), {"follow_episodes": True}, overrides(context, "recorder_node")],
        ),
    ]


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(name, default_value="", description=f"{owner} parameter (default: its YAML)")
        for name, owner in OVERRIDES.items()
    ]
    arguments.append(DeclareLaunchArgument("record", default_value="false", description="record every episode"))
    return LaunchDescription(arguments + [FASTDDS_PROFILE, OpaqueFunction(function=nodes)])
