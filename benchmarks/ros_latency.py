"""Latency of the ROS 2 policy node: camera image published -> TwistStamped received, and missed
control cycles, at a fixed camera/control rate.

    python benchmarks/ros_latency.py                      # 5 minutes at 30 Hz, random policy, CPU (+ GPU if any)
    python benchmarks/ros_latency.py --policy policies/checkpoints/default --devices cpu,cuda --backend torch
    python benchmarks/ros_latency.py --duration 30        # a quick look

policy_node runs as its own process (the console script) with the image trigger: it acts on each
camera frame and stamps the twist with the frame's stamp, so every twist is matched to its frame.
This process plays the robot: 640x480 bgr8 frames (as a real camera sends them), joint states and a
120 Hz IMU (published first, with the frame's stamp), all over Fast DDS on loopback in a domain of
its own. Latency is measured from the moment the frame is published to the middleware's receive
time of the twist; a frame without a twist is a missed cycle. Targets: p50 <= 15 ms on CPU, <= 5 ms
on GPU, no missed cycle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WARMUP_S = 5.0  # first frames are not counted: model warm-up (CUDA graphs, allocator)
# The Fast DDS profile the launch files use: camera images in shared memory.
FASTDDS_PROFILE = Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "vla_ros" / "config" / "fastdds.xml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="random", help="'random' or a checkpoint directory")
    parser.add_argument("--devices", default="auto", help="comma-separated cpu,cuda; auto: cpu and cuda if available")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="policy_node's cpu_threads: this process shares the CPU with it (0: the backend's default)",
    )
    parser.add_argument("--rate", type=float, default=30.0, help="camera frames (and control cycles) per second")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds measured per device")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    return parser.parse_args(argv)


def devices(spec: str) -> list[str]:
    if spec != "auto":
        return spec.split(",")
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


class FakeRobot:
    """Publishes the policy's inputs each cycle and matches the twists that come back to their frames."""

    def __init__(self, node, width: int, height: int, rate: float):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TwistStamped
        from sensor_msgs.msg import Image, Imu, JointState
        from std_msgs.msg import String

        from vla.contracts import topics as T
        from vla.data import messages as M
        from vla_ros import qos
        from vla_ros.conversions import fill

        self.node, self.T, self.M, self.fill, self.msgs = node, T, M, fill, (Image, Imu, JointState)
        self.camera = node.create_publisher(Image, T.TOPICS["image"], qos.SENSOR)
        self.joints = node.create_publisher(JointState, T.TOPICS["joint_states"], qos.SENSOR)
        self.imu = node.create_publisher(Imu, T.TOPICS["imu"], qos.SENSOR_QUEUED)
        self.instruction = node.create_publisher(String, T.TOPICS["instruction"], qos.LATCHED_WRITER)
        node.create_subscription(TwistStamped, T.TOPICS["cmd_twist"], self.on_twist, qos.RELIABLE)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.on_diagnostics, 10)
        rng = np.random.default_rng(0)
        self.image = fill(Image(), M.image_fields(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), 0))
        self.image.encoding = "bgr8"
        self.imu_per_frame = max(1, round(120 / rate))
        self.sent: dict[int, tuple[int, bool]] = {}  # frames not answered yet: stamp -> (publish time [ns], counted)
        self.latencies: list[float] = []  # ms, of the frames counted
        self.answered = False
        self.holds = 0
        self.counting = False
        self.frames = 0  # counted frames
        self.period_ns = round(1e9 / rate)
        self.last_publish: int | None = None
        self.stalls = 0  # this process published a frame over two periods late (the node then holds)
        self.node_figures: dict[str, list[float]] = {"latency_p50_ms": [], "inference_p50_ms": []}

    def publish(self) -> None:
        T, M, fill = self.T, self.M, self.fill
        stamp = self.node.get_clock().now().nanoseconds
        for imu_stamp in T.imu_stamps(stamp, self.imu_per_frame, 120):
            self.imu.publish(fill(self.msgs[1](), M.imu_fields([0.0, 0.0, 9.81, 0.0, 0.0, 0.0], int(imu_stamp))))
        self.joints.publish(fill(self.msgs[2](), M.joint_state_fields([0.0] * 9, [0.0] * 9, stamp)))
        fill(self.image.header, M.header(stamp, T.CAMERA_FRAME))
        now = self.node.get_clock().now().nanoseconds
        if self.counting and self.last_publish is not None and now - self.last_publish > 2 * self.period_ns:
            self.stalls += 1
        self.last_publish = now
        self.sent[stamp] = (now, self.counting)
        self.camera.publish(self.image)
        self.frames += self.counting

    def on_diagnostics(self, msg) -> None:
        """The node's own figures (per diagnostics period): camera stamp -> command published, and act()."""
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if self.counting and status.name.startswith("policy_node") and values.get("latency_p50_ms", "n/a") != "n/a":
                for key, figures in self.node_figures.items():
                    figures.append(float(values[key]))

    def on_twist(self, msg, info) -> None:
        stamp = self.M.stamp_from_header(msg.header)
        if stamp not in self.sent:  # a zero twist from the watchdog (stamped with the node's clock)
            self.holds += self.counting
            return
        published, counted = self.sent.pop(stamp)
        self.answered = True
        if counted:
            self.latencies.append((info["received_timestamp"] - published) / 1e6)


def measure(device: str, args) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    command = [
        str(Path(sys.executable).parent / "policy_node"),
        "--ros-args",
        "-p",
        f"policy:={args.policy}",
        "-p",
        f"device:={device}",
        "-p",
        f"backend:={args.backend}",
        "-p",
        "trigger:=image",
        "-p",
        f"control_rate_hz:={args.rate}",
        "-p",
        f"cpu_threads:={args.cpu_threads}",
    ]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"policy_node_{device}_", suffix=".log", delete=False)
    node_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    node = rclpy.create_node(f"ros_latency_{os.getpid()}_{device}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        robot = FakeRobot(node, args.width, args.height, args.rate)
        robot.instruction.publish(String(data="touch the red cube"))
        node.create_timer(1.0 / args.rate, robot.publish)
        start = time.monotonic()
        while not robot.answered:  # the model is loaded and answering
            executor.spin_once(timeout_sec=0.01)
            if node_process.poll() is not None or time.monotonic() - start > 120:
                raise RuntimeError(
                    f"policy_node did not answer; its log: {log.name}\n{Path(log.name).read_text()[-2000:]}"
                )
        end_warmup = time.monotonic() + WARMUP_S
        while time.monotonic() < end_warmup:
            executor.spin_once(timeout_sec=0.01)
        robot.counting = True  # frames published from now on count
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)
        robot.counting = False
        settle = time.monotonic() + 1.0  # twists of the last frames
        while time.monotonic() < settle:
            executor.spin_once(timeout_sec=0.01)
        latencies = np.array(robot.latencies)
        return {
            "device": device,
            "frames": robot.frames,
            "missed": robot.frames - len(latencies),
            "holds": robot.holds,
            "stalls": robot.stalls,
            "node_latency": np.median(robot.node_figures["latency_p50_ms"]),
            "inference": np.median(robot.node_figures["inference_p50_ms"]),
            "p50": np.percentile(latencies, 50),
            "p99": np.percentile(latencies, 99),
            "max": latencies.max(),
        }
    finally:
        executor.shutdown()
        node.destroy_node()
        node_process.send_signal(2)
        try:
            node_process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node_process.kill()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["ROS_DOMAIN_ID"] = str(101 - os.getpid() % 50)  # a domain of its own, on loopback only
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(FASTDDS_PROFILE))
    import rclpy

    rclpy.init()
    try:
        results = [measure(device, args) for device in devices(args.devices)]
    finally:
        rclpy.shutdown()
    print(
        f"\nimage published -> twist received, policy {args.policy} ({args.backend}), {args.width}x{args.height} bgr8 "
        f"at {args.rate:g} Hz, {args.duration:g} s per device; "
        f"Fast DDS profile {os.environ['FASTDDS_DEFAULT_PROFILES_FILE']}"
    )
    print(
        f"{'device':8}{'frames':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'missed':>8}{'holds':>7}{'stalls':>8}"
        f"{'node p50':>10}{'act p50':>9}"
    )
    for r in results:
        print(
            f"{r['device']:8}{r['frames']:8d}{r['p50']:9.2f}{r['p99']:9.2f}{r['max']:9.2f}{r['missed']:8d}{r['holds']:7d}"
            f"{r['stalls']:8d}{r['node_latency']:10.2f}{r['inference']:9.2f}"
        )
    print(
        "holds: zero twists from the node's watchdog; stalls: this process (the robot) published a frame over two\n"
        "periods late; node p50: camera stamp -> command published, inside policy_node; act p50: the policy's act()"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
