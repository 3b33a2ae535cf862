"""The launch files and their parameter files: what they name exists, and every node starts with
its file's parameters declared and holding the file's values."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from policies import CHECKPOINT_DIR

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ros2_ws" / "src" / "vla_ros"
CONFIG = PACKAGE / "config"
BIN = Path(sys.executable).parent
CHECKPOINT = CHECKPOINT_DIR / "default"
NODES = ("policy_node", "sim_node", "recorder_node", "replay_node")


def launch_references(path: Path) -> tuple[set[str], set[str]]:
    """Executables and configuration files that a launch file names (read from its source: `launch`
    is not installable with pip)."""
    tree = ast.parse(path.read_text())
    executables, configs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "executable" and isinstance(node.value, ast.Constant):
            executables.add(node.value.value)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith((".yaml", ".xml")):
            configs.add(node.value)
    return executables, configs


def test_launch_files_name_existing_executables_and_parameter_files():
    setup = (PACKAGE / "setup.py").read_text()
    launch_files = sorted((ROOT / "launch").glob("*.launch.py"))
    assert {p.name for p in launch_files} >= {"sim_closed_loop.launch.py", "robot.launch.py", "replay.launch.py"}
    named = set()
    for path in launch_files:
        executables, configs = launch_references(path)
        assert executables and configs, f"{path.name} names no node or configuration file"
        for executable in executables:
            assert executable in NODES and f'"{executable}"' in setup, f"{path.name}: unknown executable {executable}"
            assert (BIN / executable).is_file(), f"console script {executable} is not installed"
        for config in configs:
            assert (CONFIG / config).is_file(), f"{path.name}: no file config/{config}"
        assert "fastdds.xml" in configs, f"{path.name} does not set the Fast DDS profile"
        named |= configs
    assert named == {p.name for p in CONFIG.iterdir()}, "a configuration file no launch file uses"
    assert 'glob("config/*.yaml") + glob("config/*.xml")' in setup, "setup.py installs the configuration files"
    assert 'glob("launch/*.launch.py")' in setup, "setup.py installs the launch files"
    assert (ROOT / "launch").resolve() == PACKAGE / "launch", "launch/ is the package's, for the path form"


def launch_tuples(path: Path) -> dict[str, tuple]:
    """The tuples of names a launch file assigns at its top level (e.g. its argument lists)."""
    return {target.id: ast.literal_eval(node.value) for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
            for target in node.targets if isinstance(target, ast.Name)}


def test_robot_launch_exposes_the_tuning_parameters():
    """robot.launch.py's arguments are policy_node parameters, the tuning ones with a default in its
    parameter file (the launch file reads their types there), and the file's CPU default suits a
    shared CPU (cpu_threads 0 ran at 2 Hz instead of 10 on 2 cores)."""
    from vla_ros.policy_node import PARAMETERS

    names = launch_tuples(PACKAGE / "launch" / "robot.launch.py")
    defaults = yaml.safe_load((CONFIG / "policy_robot.yaml").read_text())["policy_node"]["ros__parameters"]
    assert {"cpu_threads", "control_rate_hz", "trigger", "max_input_age"} <= set(names["TUNING"])
    assert set(names["TUNING"] + names["OVERRIDES"]) <= PARAMETERS.keys()
    assert set(names["TUNING"]) <= defaults.keys()
    assert defaults["cpu_threads"] == 1


@pytest.mark.parametrize("config, executable, overrides, state", [
    ("policy_sim.yaml", "policy_node", {} if CHECKPOINT.is_dir() else {"policy": "random"}, "active"),
    ("policy_robot.yaml", "policy_node", {"policy": "random"}, "inactive"),
    ("sim.yaml", "sim_node", {}, None),
    ("recorder.yaml", "recorder_node", {"follow_episodes": True}, None),
    ("replay.yaml", "replay_node", {"bag": "BAG"}, None),
])
def test_nodes_start_with_the_launch_parameter_files(ros, tmp_path, sim_bag, config, executable, overrides, state):
    """Every parameter of the file is declared by the node and holds the file's value."""
    if overrides.get("bag") == "BAG":
        overrides = {"bag": str(sim_bag(tmp_path / "bag"))}
    ros.start(executable, CONFIG / config, **overrides)
    values = yaml.safe_load((CONFIG / config).read_text())[executable]["ros__parameters"]
    values |= {k: v for k, v in overrides.items() if k in values or k in ("bag", "follow_episodes")}
    got = ros.get_parameters(executable, list(values))
    assert got == values, f"{config}: parameters not declared (None) or not as in the file"
    if state is not None:
        ros.spin_until(lambda: ros.lifecycle_state() == state, 30, f"policy_node {state}")
    assert ros.alive(executable)

