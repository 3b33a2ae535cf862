"""Replay a recorded episode with its original timing (like `ros2 bag play`).

    ros2 launch vla_ros replay.launch.py bag:=datasets/ros/episode_000000 [rate:=0.5]

Parameters come from the package's config/replay.yaml; bag (required) and rate override it.
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


def nodes(context):
    rate = LaunchConfiguration("rate").perform(context)
    given = {"bag": LaunchConfiguration("bag").perform(context)} | (
        {"rate": float(yaml.safe_load(rate))} if rate else {}
    )
    return [
        Node(
            package="vla_ros",
            executable="replay_node",
            name="replay_node",
            output="screen",
            parameters=[str(CONFIG / "replay.yaml"), given],
        )
    ]


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument("bag", description="episode: rosbag2 directory or .mcap file"),
            DeclareLaunchArgument("rate", default_value="", description="playback speed factor (default: its YAML)"),
            FASTDDS_PROFILE,
            OpaqueFunction(function=nodes),
        ]
    )
