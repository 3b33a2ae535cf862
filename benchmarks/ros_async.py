"""Asynchronous against synchronous inference in the ROS 2 policy node, in the same run.

    python benchmarks/ros_async.py                            # the shipped checkpoint, CPU, ~6 minutes
    python benchmarks/ros_async.py --duration 20 --episodes 5 # a quick look

1. A model slower than the control loop: policy_node at 30 Hz (timer trigger) with every inference
   slowed by 3 control periods (`inference_delay`), driving sim_node in real time at 30 Hz. Per mode:
   the control cycles without a command (missed), the holds (zero twists) and the jumps of the
   commanded velocity between consecutive commands. Target for async: 0 missed, jumps bounded (no
   larger than synchronous mode's).
2. Closed loop in sim at normal speed: sim_node in real time at 10 Hz + policy_node (timer trigger,
   10 Hz), the same held-out episodes in each mode. Target: async success within 5 points of sync.
Each node runs as its own process over Fast DDS on loopback, in a domain of its own.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "ros2_ws" / "src" / "vla_ros" / "config"
BIN = Path(sys.executable).parent
MODES = ("sync", "async")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=str(ROOT / "policies" / "checkpoints" / "default"))
    parser.add_argument("--rate", type=float, default=30.0, help="control rate of part 1 [Hz]")
    parser.add_argument("--slowdown", type=float, default=3.0, help="inference delay of part 1, in control periods")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured per mode in part 1")
    parser.add_argument("--episodes", type=int, default=20, help="sim episodes per mode in part 2")
    parser.add_argument("--task", default="reach")
    return parser.parse_args(argv)


class Ros:
    """This process's node, and the node processes it starts (stopped with SIGINT)."""

    def __init__(self, logs: Path):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.processes = logs, []
        self.node = rclpy.create_node(f"ros_async_{os.getpid()}")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)

    def start(self, executable: str, params_file: str, **params) -> None:
        command = [str(BIN / executable), "--ros-args", "--params-file", str(CONFIG / params_file)]
        for key, value in params.items():
            command += ["-p", f"{key}:={value}"]
        log = open(self.logs / f"{executable}.log", "w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    def spin_until(self, condition, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"no {what} within {timeout} s (or a node exited); logs in {self.logs}")
            self.executor.spin_once(timeout_sec=0.01)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.spin_until(lambda: time.monotonic() > end, seconds + 1, "end")

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(2)
        for process in self.processes:
            process.wait(timeout=30)
        self.processes = []
        self.executor.shutdown()
        self.node.destroy_node()


def velocity(twist) -> np.ndarray:
    t = twist.twist
    return np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])


def slow_model(mode: str, args, logs: Path) -> dict:
    """Part 1: missed cycles, holds and velocity jumps with inference slowed to args.slowdown periods.
    An episode's first command waits for a first inference in either mode: the control periods from
    the episode's start to it are not counted."""
    import json

    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import String

    from vla.contracts.topics import TOPICS
    from vla_ros import qos

    ros = Ros(logs)
    try:
        twists, starts = [], []  # (receive time, velocity); episode starts
        ros.node.create_subscription(TwistStamped, TOPICS["cmd_twist"],
                                     lambda m: twists.append((time.monotonic(), velocity(m))), qos.RELIABLE)
        ros.node.create_subscription(String, TOPICS["episode_info"],
                                     lambda m: json.loads(m.data)["done"] or starts.append(time.monotonic()),
                                     qos.EPISODES)
        ros.start("policy_node", "policy_sim.yaml", policy=args.policy, trigger="timer", inference=mode,
                  control_rate_hz=args.rate, inference_delay=args.slowdown / args.rate, max_input_age=0.5)
        ros.spin_until(lambda: twists, 180, f"{mode} policy_node active (holding: no inputs yet)")
        # the robot: the sim in real time at the control rate (the twist's velocity, as trained at 10 Hz)
        ros.start("sim_node", "sim.yaml", task=args.task, step_on_command="false", control_hz=round(args.rate),
                  max_steps=round(40 * args.rate / 10), start_delay=3.0)
        ros.spin_until(lambda: sum(v.any() for _, v in twists) >= 10, 60, f"{mode} commands")
        ros.spin_for(3.0)  # warm-up
        begin = time.monotonic()
        ros.spin_for(args.duration)
        end = time.monotonic()
    finally:
        ros.stop()
    window = [(when, v) for when, v in twists if begin <= when < end]
    commands = [(when, v) for when, v in window if v.any()]
    waiting = 0.0  # seconds from an episode's start to its first command
    for started in (when for when in starts if begin <= when < end):
        first = next((when for when, _ in commands if when >= started), end)
        waiting += first - started
    # jumps between consecutive commands of one episode (the next episode starts elsewhere)
    jumps = np.array([b - a for (t0, a), (t1, b) in itertools.pairwise(commands)
                      if not any(t0 < when <= t1 for when in starts)])
    return {"cycles": round((end - begin - waiting) * args.rate), "commands": len(commands),
            "holds": len(window) - len(commands), "episodes": sum(begin <= when < end for when in starts),
            "linear": np.linalg.norm(jumps[:, :3], axis=1), "angular": np.linalg.norm(jumps[:, 3:], axis=1)}


def closed_loop(mode: str, args, logs: Path) -> float:
    """Part 2: success rate of args.episodes real-time sim episodes."""
    import json

    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import String

    from vla.contracts.topics import TOPICS
    from vla_ros import qos

    ros = Ros(logs)
    try:
        infos, twists = [], []
        ros.node.create_subscription(String, TOPICS["episode_info"], lambda m: infos.append(json.loads(m.data)),
                                     qos.EPISODES)
        ros.node.create_subscription(TwistStamped, TOPICS["cmd_twist"], twists.append, qos.RELIABLE)
        ros.start("policy_node", "policy_sim.yaml", policy=args.policy, trigger="timer", inference=mode,
                  control_rate_hz=10.0, max_input_age=0.0)
        ros.spin_until(lambda: twists, 180, f"{mode} policy_node active (holding: no inputs yet)")
        ros.start("sim_node", "sim.yaml", task=args.task, step_on_command="false", start_delay=3.0)
        done = lambda: [i for i in infos if i["done"]]
        ros.spin_until(lambda: len(done()) >= args.episodes, 120 + 30 * args.episodes, f"{args.episodes} episodes")
        episodes = done()[: args.episodes]
    finally:
        ros.stop()
    return 100 * float(np.mean([i["success"] for i in episodes]))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 50)  # a domain of its own, on loopback only
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(CONFIG / "fastdds.xml"))
    import rclpy

    logs = Path(tempfile.mkdtemp(prefix="ros_async_"))
    rclpy.init()
    try:
        slow = {mode: slow_model(mode, args, logs / f"slow_{mode}") for mode in MODES}
        success = {mode: closed_loop(mode, args, logs / f"closed_loop_{mode}") for mode in MODES}
    finally:
        rclpy.shutdown()
    print(f"\n1. policy {args.policy}, control at {args.rate:g} Hz, inference slowed by {args.slowdown:g} periods "
          f"({1e3 * args.slowdown / args.rate:.0f} ms), {args.duration:g} s per mode (logs: {logs})")
    print(f"{'mode':7}{'episodes':>9}{'cycles':>8}{'commands':>10}{'missed':>8}{'holds':>7}"
          f"{'|dv| p99 m/s':>14}{'max':>7}{'|dw| p99 rad/s':>16}{'max':>7}")
    for mode, r in slow.items():
        print(f"{mode:7}{r['episodes']:9d}{r['cycles']:8d}{r['commands']:10d}{max(0, r['cycles'] - r['commands']):8d}"
              f"{r['holds']:7d}{np.percentile(r['linear'], 99):14.3f}{r['linear'].max():7.3f}"
              f"{np.percentile(r['angular'], 99):16.3f}{r['angular'].max():7.3f}")
    print("cycles: control periods, less those from each episode's start to its first command (a first inference\n"
          "in either mode); missed: cycles without a command; holds: zero twists (including those first waits);\n"
          "|dv|, |dw|: change of the commanded linear and angular velocity between consecutive commands")
    print(f"\n2. closed loop in sim (real time, 10 Hz, task {args.task}), {args.episodes} held-out episodes per mode: "
          + ", ".join(f"{mode} {value:.0f} % success" for mode, value in success.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
