"""ros2_ws as a roboticist builds it: `colcon build` (colcon-core and colcon-ros from PyPI) into a
temporary directory, then the install space's layout and its executables started the way `ros2 run`
and `ros2 launch` start them: <prefix>/lib/vla_ros/<node> run directly (its shebang picks the
interpreter) in the environment that sourcing the install's setup script gives. Skipped without colcon."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("colcon_core")
pytest.importorskip("colcon_ros")
rclpy = pytest.importorskip("rclpy")

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vla_ros"
NODES = ("policy_node", "sim_node", "recorder_node", "replay_node")
LAUNCH_FILES = ("sim_closed_loop.launch.py", "robot.launch.py", "replay.launch.py")


@pytest.fixture(scope="module", params=["install", "symlink-install"])
def workspace(request, tmp_path_factory) -> dict:
    """ros2_ws built into a temporary directory (nothing written into the source tree), and the
    environment of a shell that sourced its install/local_setup.sh."""
    base = tmp_path_factory.mktemp("colcon")
    command = [sys.executable, "-m", "colcon", "--log-base", str(base / "log"), "build",
               "--base-paths", str(ROOT / "ros2_ws" / "src"),
               "--build-base", str(base / "build"), "--install-base", str(base / "install")]
    if request.param == "symlink-install":
        command.append("--symlink-install")
    built = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"colcon build failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    script = f". {shlex.quote(str(base / 'install' / 'local_setup.sh'))} && env -0"
    sourced = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in sourced.split("\0") if "=" in item)
    return {"prefix": base / "install" / PACKAGE, "env": env}


def python_in(workspace: dict, code: str) -> list[str]:
    """The lines `code` prints, run with this interpreter in the sourced environment."""
    return subprocess.run([sys.executable, "-c", code], env=workspace["env"], capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()


def test_the_path_form_and_the_package_form_run_the_same_launch_files():
    """`ros2 launch launch/X` (repository) and `ros2 launch vla_ros X` (the package's launch/) are one file."""
    for name in LAUNCH_FILES:
        assert (ROOT / "launch" / name).resolve() == (ROOT / "ros2_ws" / "src" / PACKAGE / "launch" / name)


def test_the_install_space_has_what_ros2_run_and_ros2_launch_look_up(workspace):
    prefix = workspace["prefix"]
    for node in NODES:
        script = prefix / "lib" / PACKAGE / node
        assert script.is_file() and os.access(script, os.X_OK), script
        # colcon runs setup.py with its own interpreter, which setuptools writes into the shebang:
        # the nodes run with the Python that ran colcon (the project's venv), whatever PATH says later
        shebang = script.read_text().splitlines()[0]
        assert Path(shebang[2:].split()[0]).parent == Path(sys.executable).parent, shebang
    # `ros2 run` (get_package_prefix) and `ros2 launch vla_ros X` (get_package_share_directory, then
    # the file searched for under it), resolved in the sourced environment
    found_prefix, share = python_in(workspace, (
        "from ament_index_python.packages import get_package_prefix, get_package_share_directory\n"
        f"print(get_package_prefix('{PACKAGE}'), get_package_share_directory('{PACKAGE}'))"))
    assert Path(found_prefix) == prefix
    for name in LAUNCH_FILES:
        assert [Path(d) / name for d, _, files in os.walk(share) if name in files] == [Path(share) / "launch" / name]
    config = {p.name for p in (Path(share) / "config").iterdir()}
    assert {"sim.yaml", "policy_sim.yaml", "policy_robot.yaml", "recorder.yaml", "replay.yaml", "fastdds.xml"} <= config
    assert all(path.resolve().is_file() for path in Path(share).rglob("*") if path.is_symlink())


def test_the_built_nodes_close_the_loop_and_stop_on_sigint(ros, workspace, tmp_path):
    """sim_node and policy_node (random policy: no checkpoint), started from the install space as
    `ros2 launch` starts them, answer each other and exit 0 on SIGINT."""
    prefix, config = workspace["prefix"], workspace["prefix"] / "share" / PACKAGE / "config"
    env = workspace["env"] | {k: os.environ[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")}
    arguments = {"sim_node": ["--params-file", str(config / "sim.yaml")],
                 "policy_node": ["--params-file", str(config / "policy_sim.yaml"), "-p", "policy:=random"]}
    twists = ros.twists()
    for name, args in arguments.items():
        log = open(tmp_path / f"{name}.log", "w")
        ros.processes[name] = subprocess.Popen([str(prefix / "lib" / PACKAGE / name), "--ros-args", *args], env=env,
                                               stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    ros.spin_until(lambda: len(twists) >= 3, 120, "twists of the built policy_node driving the built sim_node")
    for name in arguments:
        ros.processes[name].send_signal(signal.SIGINT)
    for name in arguments:
        try:
            code = ros.processes[name].wait(timeout=30)
        except subprocess.TimeoutExpired:  # where is it stuck? (the runner dumps its stacks on SIGUSR1)
            ros.processes[name].send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            code = "still running after 30 s"
        assert code == 0, f"{name}: {code}\n{ros.log(name)}"
