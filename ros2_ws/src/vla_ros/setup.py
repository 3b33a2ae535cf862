"""ament_python package: `colcon build` on a ROS 2 install, or `pip install -e` into the project venv."""
from glob import glob

from setuptools import setup

PACKAGE = "vla_ros"
NODES = ["policy_node", "sim_node", "recorder_node", "replay_node"]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),  # `ros2 launch vla_ros <file>`
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    description="ROS 2 nodes for the VLA stack",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"{node} = {PACKAGE}.{node}:main" for node in NODES]},
)
