"""Shared by the ROS 2 tests: a DDS domain of this test run's own on loopback, a harness that starts
node processes (each a console script, as a robot runs them) and talks to them with rclpy, a fake
robot publishing like a robot's drivers, and the closed loop in sim recorded once for several tests."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from policies import RandomPolicy  # noqa: E402
from sim import SimConfig, make_env  # noqa: E402
from vla.contracts.topics import MSG_TYPES, TOPICS  # noqa: E402
from vla.data import messages as M  # noqa: E402
from vla.data.dataset import load_manifest  # noqa: E402
from vla.data.record import record_episode  # noqa: E402
from vla_ros import qos  # noqa: E402
from vla_ros.conversions import fill, message_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ros2_ws" / "src" / "vla_ros"
CONFIG = PACKAGE / "config"
BIN = Path(sys.executable).parent
PERIOD = 0.1  # control period of the policy node in these tests (10 Hz)
FASTDDS_PROFILE = "FASTDDS_DEFAULT_PROFILES_FILE"
EPISODES, STEPS = 3, 8  # of the recorded closed loop (sim_loop)
RECORDED_KEYS = ("image", "joint_states", "imu", "instruction", "action", "cmd_twist", "gripper")
RELIABLE_TOPICS = {TOPICS[k] for k in ("action", "cmd_twist", "gripper")}


@pytest.fixture(scope="session", autouse=True)
def ros_domain():
    """A DDS domain of this test run's own on loopback, for this process and the nodes it starts,
    with the Fast DDS profile the launch files use."""
    saved = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", FASTDDS_PROFILE)}
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault(FASTDDS_PROFILE, str(CONFIG / "fastdds.xml"))
    rclpy.init()
    try:
        yield
    finally:
        rclpy.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Harness:
    """Node processes started by a test (always stopped at its end) and an rclpy node to talk to them."""

    instances = itertools.count()

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.node = rclpy.create_node(f"test_ros_{os.getpid()}_{next(Harness.instances)}")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.clients: dict[str, object] = {}  # one per service: each new client must be discovered anew

    def start(self, executable: str, params_file: Path | None = None, name: str | None = None, nice: int = 0,
              **params):
        """Start a node process (`nice`: lower its CPU priority by that much)."""
        command = ["nice", "-n", str(nice), str(BIN / executable), "--ros-args"]
        if params_file is not None:
            command += ["--params-file", str(params_file)]
        for key, value in params.items():
            command += ["-p", f"{key}:={json.dumps(value) if isinstance(value, bool) else value}"]
        name = name or executable
        log = open(self.logs / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.logs)
        return self.processes[name]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def logs_text(self) -> str:
        return "\n".join(f"---- {name}:\n{self.log(name)[-3000:]}" for name in self.processes)

    def spin_until(self, condition, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.logs_text()}")
            dead = [name for name, p in self.processes.items() if p is not None and p.poll() is not None]
            if dead:
                pytest.fail(f"{dead} exited while waiting for {what}\n{self.logs_text()}")
            self.executor.spin_once(timeout_sec=0.005)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.005)

    def call(self, srv_type, service: str, request, timeout: float = 30.0, resend_after: float | None = None,
             took_effect=None):
        """The answer of `service`, waiting up to `timeout` (generous: nodes answer once loaded).
        Fast DDS drops an answer it cannot deliver within 100 ms, which a busy machine sometimes
        cannot (the server has not yet discovered this client's response reader). `resend_after`:
        for a query that may be asked again, a request left unanswered that long is sent again.
        `took_effect`: for a command that must not be sent twice, a condition that shows it was
        carried out; once it holds, a lost answer is None."""
        if service not in self.clients:
            self.clients[service] = self.node.create_client(srv_type, service)
        client = self.clients[service]
        end = time.monotonic() + timeout
        if not client.service_is_ready():
            self.spin_until(client.service_is_ready, timeout, f"service {service}")
            self.spin_for(1.0)  # for the server to discover this client's response reader as well
        effect = took_effect or (lambda: False)
        while True:
            future = client.call_async(request)
            attempt = min(end, time.monotonic() + resend_after) if resend_after else end
            answered = lambda future=future, attempt=attempt: future.done() or effect() or time.monotonic() > attempt
            self.spin_until(answered, timeout, f"the answer of {service}")
            if effect():  # carried out: the answer may still come, or be lost
                grace = time.monotonic() + 1.0
                waited = lambda future=future, grace=grace: future.done() or time.monotonic() > grace
                self.spin_until(waited, 2.0, f"the answer of {service}")
                return future.result() if future.done() else None
            if future.done():
                return future.result()
            client.remove_pending_request(future)
            if time.monotonic() > end:
                pytest.fail(f"no answer of {service} within {timeout} s\n{self.logs_text()}")

    def start_recording(self) -> None:
        """~/record true, judged by the recorder's log when its answer is lost. Asked again after 5 s
        without either: a request can be lost too (the client found a stale server of an earlier
        test's node first); a repeat that arrives after all is refused (already recording)."""
        began = lambda: self.log("recorder_node").count("recording episode_")
        before = began()
        answer = self.call(SetBool, "/recorder_node/record", SetBool.Request(data=True), resend_after=5.0,
                           took_effect=lambda: began() > before)
        assert answer is None or answer.success or began() > before, answer.message

    def stop(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGINT)
        self.processes[name].wait(timeout=10)
        self.processes[name] = None

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def close(self) -> None:
        running = [p for p in self.processes.values() if p is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # the nodes close what they write
        for process in running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.executor.shutdown()
        self.node.destroy_node()

    # ---- what the nodes publish and say ---------------------------------------------------------
    def receive(self, topics: dict[str, str], profile=None) -> Received:
        """Raw messages of `topics` (topic -> message type) from now on; every one by default."""
        return Received(self.node, topics, profile or Received.everything)

    def fake_robot(self) -> FakeRobot:
        """A robot's drivers publishing camera, joint states and IMU (see FakeRobot)."""
        return FakeRobot(self)

    def twists(self) -> list[tuple[float, TwistStamped]]:
        """(receive time [s, monotonic], twist) of every /vla/cmd_twist from now on."""
        twists = []
        self.node.create_subscription(TwistStamped, TOPICS["cmd_twist"], lambda m: twists.append((time.monotonic(), m)),
                                      qos.RELIABLE)
        return twists

    @staticmethod
    def is_zero(twist: TwistStamped) -> bool:
        t = twist.twist
        return not any((t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z))

    def moving_again(self, twists, what: str, timeout: float = 1.0) -> None:
        start = len(twists)
        self.spin_until(lambda: sum(not self.is_zero(t) for _, t in twists[start:]) >= 2, timeout, what)

    def holding_reasons(self) -> list[str]:
        """The policy node's diagnostics 'holding' values from now on, newest last."""
        reasons = []

        def on_diagnostics(msg: DiagnosticArray):
            for status in msg.status:
                if status.name.startswith("policy_node"):
                    reasons.append({kv.key: kv.value for kv in status.values}.get("holding", ""))

        self.node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        return reasons

    def episode_infos(self) -> list[dict]:
        """The episode announcements of sim_node from now on."""
        infos = []
        self.node.create_subscription(String, TOPICS["episode_info"], lambda m: infos.append(json.loads(m.data)),
                                      qos.EPISODES)
        return infos

    def get_parameters(self, node: str, names: list[str]) -> dict:
        response = self.call(GetParameters, f"/{node}/get_parameters", GetParameters.Request(names=names), timeout=30,
                             resend_after=5.0)
        return {name: rclpy.parameter.parameter_value_to_python(value) for name, value in zip(names, response.values)}

    def lifecycle_state(self, timeout: float = 30.0) -> str:
        request = GetState.Request()
        return self.call(GetState, "/policy_node/get_state", request, timeout, resend_after=5.0).current_state.label

    def wait_active(self, timeout: float = 120) -> None:
        """Wait for policy_node to be active (loading a model takes a while); fail at once if it cannot."""
        def active():
            if "configure failed" in self.log("policy_node"):
                pytest.fail(self.log("policy_node"))
            return self.lifecycle_state(timeout) == "active"  # it answers once loaded (autostart configures first)

        self.spin_until(active, timeout, "policy_node active")


@pytest.fixture
def ros(tmp_path):
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


class Received:
    """Messages of some topics as received: (the middleware's receive time [ns], raw CDR bytes);
    `profile(topic)` is the QoS to receive a topic with."""

    def __init__(self, node, topics: dict[str, str], profile):
        self.messages: dict[str, list[tuple[int, bytes]]] = {topic: [] for topic in topics}
        self.subscriptions = [
            node.create_subscription(message_class(msgtype), topic,
                                     lambda data, info, topic=topic: self.messages[topic].append(
                                         (info["received_timestamp"], data)),
                                     profile(topic), raw=True)
            for topic, msgtype in topics.items()]

    def decoded(self, topic: str, msg_type) -> list:
        return [deserialize_message(data, msg_type) for _, data in self.messages[topic]]

    @staticmethod
    def everything(topic: str) -> QoSProfile:
        """Every message: reliable where the writer is, best effort (matching any writer) elsewhere."""
        reliability = ReliabilityPolicy.RELIABLE if topic in RELIABLE_TOPICS else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(depth=1000, reliability=reliability)


class FakeRobot:
    """Publishes camera (raw, and jpeg on <camera>/compressed as image_transport does), joint states
    and IMU like a robot's drivers (20 Hz, IMU 6x faster), and the instruction (latched).
    `bad[stream]` replaces a stream's messages while set; `clock_offset` [ns] is added to the stamps
    (a robot computer whose clock is off)."""

    def __init__(self, ros: Harness):
        node = ros.node
        self.ros = ros
        self.camera = node.create_publisher(Image, TOPICS["image"], qos.SENSOR)
        self.compressed_camera = node.create_publisher(CompressedImage, TOPICS["image"] + "/compressed", qos.SENSOR)
        self.joints = node.create_publisher(JointState, TOPICS["joint_states"], qos.SENSOR)
        self.imu = node.create_publisher(Imu, TOPICS["imu"], qos.SENSOR_QUEUED)
        self.instruction = node.create_publisher(String, TOPICS["instruction"], qos.LATCHED_WRITER)
        self.camera_on = True
        self.image, self.jpeg = Image(), CompressedImage()  # set by show()
        self.show(np.full((96, 96, 3), 128, np.uint8), "rgb8")
        self.last_frame = 0.0  # when the newest camera message was published [s, monotonic]
        self.bad: dict[str, object] = {}
        self.clock_offset = 0
        node.create_timer(0.05, self.publish)

    def now(self) -> int:
        return self.ros.node.get_clock().now().nanoseconds + self.clock_offset

    def show(self, rgb: np.ndarray, encoding: str) -> None:
        """Camera frames from now on: `rgb` sent in `encoding`, and as jpeg."""
        self.jpeg = CompressedImage(format="bgr8; jpeg compressed bgr8",
                                    data=cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
        pixels = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1]}[encoding]
        self.image = fill(Image(), M.image_fields(pixels, 0))
        self.image.encoding = encoding

    def publish(self) -> None:
        stamp = self.now()
        header = M.header(stamp, "")["stamp"]
        for k in range(6):
            good = lambda k=k: fill(Imu(), M.imu_fields([0, 0, 9.81, 0, 0, 0.01 * k], stamp))
            self.imu.publish(self.bad.get("imu", good)())
        joints = (
            self.bad["joint_states"]()
            if "joint_states" in self.bad
            else fill(JointState(), M.joint_state_fields([0.0] * 9, [0.0] * 9, stamp))
        )
        self.joints.publish(joints)
        if self.camera_on:
            image = self.bad["camera"]() if "camera" in self.bad else self.image
            for msg, publisher in ((image, self.camera), (self.jpeg, self.compressed_camera)):
                fill(msg.header, {"stamp": header})
                publisher.publish(msg)
            self.last_frame = time.monotonic()


@pytest.fixture(scope="session")
def sim_bag():
    """sim_bag(path) records a short sim episode in-process (the format `vla collect` writes) at path."""

    def record(path: Path) -> Path:
        env = make_env("reach", SimConfig(max_steps=5))
        try:
            record_episode(env, RandomPolicy(0), 3, path)
        finally:
            env.close()
        return path

    return record


@pytest.fixture
def policy_with_robot(ros):
    """policy_node (random policy, timer trigger) with a fake robot, commanding."""
    ros.start("policy_node", policy="random", trigger="timer", control_rate_hz=1 / PERIOD, diagnostics_period=0.2)
    robot = ros.fake_robot()
    twists = ros.twists()
    reasons = ros.holding_reasons()
    robot.instruction.publish(String(data="touch the red cube"))
    ros.moving_again(twists, "the policy's first commands", timeout=30)
    return robot, twists, reasons


@pytest.fixture(scope="session")
def sim_loop(tmp_path_factory):
    """sim_node (lockstep) + policy_node (random) + recorder_node (one bag per episode), with the
    launch files' parameter files, run for EPISODES episodes of STEPS steps; everything published
    is received here too."""
    logs = tmp_path_factory.mktemp("sim_loop")
    ros = Harness(logs)
    try:
        received = ros.receive({TOPICS[k]: MSG_TYPES[k] for k in RECORDED_KEYS})
        infos = ros.episode_infos()
        dataset = logs / "dataset"
        ros.start("recorder_node", CONFIG / "recorder.yaml", follow_episodes=True, output_dir=dataset)
        ros.start("policy_node", CONFIG / "policy_sim.yaml", policy="random")
        ros.wait_active()
        ros.call(SetBool, "/recorder_node/record", SetBool.Request(data=False))  # up (answers: not recording)
        ros.start("sim_node", CONFIG / "sim.yaml", max_steps=STEPS, start_delay=600.0)  # started below
        ros.spin_until(
            lambda: all(s.get_publisher_count() for s in received.subscriptions), 30, "the loop's publishers"
        )
        ros.spin_for(1.0)  # for the nodes to discover one another as well
        ros.call(Trigger, "/sim_node/reset", Trigger.Request())  # the first episode
        ros.spin_until(lambda: len(load_manifest(dataset)) >= EPISODES, 60, f"{EPISODES} recorded episodes")
        ros.stop("sim_node")
        ros.spin_for(1.0)  # the recorder writes what it holds back, this process receives the rest
        for name in ("policy_node", "recorder_node"):  # done: later tests use what they published and wrote
            ros.stop(name)
        ros.started = {i["seed"] for i in infos if not i["done"]}  # episodes this process saw from their start
        yield ros, received, {i["seed"]: i for i in infos if i["done"]}, dataset
    finally:
        ros.close()
