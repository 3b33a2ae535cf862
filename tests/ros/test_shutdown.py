"""Ctrl-C and `ros2 launch`'s stop: every node, on SIGINT or SIGTERM, once or repeated, finishes its
work (policy_node: a last zero twist; recorder_node: its episode closed and listed) and exits 0
without a traceback, within its deadlines (vla_ros.runner)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from vla.data.dataset import PARTIAL, load_manifest  # noqa: E402
from vla.data.reader import read_episode  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "vla_ros" / "config"
NODES = ("sim_node", "policy_node", "recorder_node", "replay_node")
# What launch does: the terminal's SIGINT to the group and launch's own 10 ms later, or its SIGTERM
# escalation; and a plain `kill`.
PATTERNS = {"SIGINT twice": (signal.SIGINT, signal.SIGINT), "SIGINT, SIGTERM": (signal.SIGINT, signal.SIGTERM),
            "SIGTERM": (signal.SIGTERM,)}
# The nodes' own deadlines: 1.8 s for their work, 3 s more to leave ROS (an overrun exits 1); the wait
# measured here also holds the time the processes wait for a CPU on a busy machine.
EXIT_WITHIN_S = 6.0
STREAMS = 7  # recorded without the wrist camera: image, joint states, IMU, instruction, action, twist, gripper


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_node_stops_cleanly_on_signals(ros, tmp_path, sim_bag, pattern):
    dataset = tmp_path / "dataset"
    twists = ros.twists()
    ros.start("sim_node", CONFIG / "sim.yaml", step_on_command=False, start_delay=0.5)
    ros.start("policy_node", CONFIG / "policy_sim.yaml", policy="random", trigger="timer", max_input_age=0.0)
    ros.start("recorder_node", CONFIG / "recorder.yaml", output_dir=dataset)
    ros.start("replay_node", CONFIG / "replay.yaml", bag=sim_bag(tmp_path / "bag"), autoplay=False)
    ros.moving_again(twists, "the policy commanding the sim", timeout=60)
    # Every recorded stream has two publishers (sim or policy, and replay); one not discovered yet (seconds
    # on a busy machine) would record nothing.
    ros.spin_until(lambda: ros.log("recorder_node").count("found a publisher (2 now)") == STREAMS, 60,
                   "the recorder discovering every publisher")
    ros.start_recording()
    ros.spin_for(1.0)  # an episode of about 10 steps

    processes = {name: ros.processes[name] for name in NODES}
    start = time.monotonic()
    for signum in PATTERNS[pattern]:
        for process in processes.values():
            process.send_signal(signum)
        time.sleep(0.01)
    exited = {}
    for name, process in processes.items():
        process.wait(timeout=30)
        exited[name] = time.monotonic() - start
    ros.spin_for(0.5)  # messages in flight

    for name, process in processes.items():
        log = ros.log(name)
        assert process.returncode == 0 and "Traceback" not in log, f"{name} ({pattern}):\n{log[-3000:]}"
        assert exited[name] <= EXIT_WITHIN_S, f"{name} took {exited[name]:.1f} s to exit ({pattern})"
    assert ros.is_zero(twists[-1][1]), "the last twist of policy_node is not zero"
    listed = load_manifest(dataset)
    assert len(listed) == 1, ros.log("recorder_node")
    listed = listed[0]
    assert len(read_episode(dataset / listed["path"])) == listed["steps"] > 0
    assert not (dataset / PARTIAL).exists(), "an empty .partial directory was left behind"
