"""policy_node: a VLA policy closing the loop over ROS 2, as a lifecycle node.

configure loads the policy, activate starts control, deactivate stops it with a zero twist
(`autostart` chooses where it gets at start). In: the camera (sensor_msgs/Image, or
CompressedImage on `<camera_topic>/compressed` with image_transport: compressed), the wrist camera
likewise if the model takes one, /joint_states, /imu/data, /vla/instruction (every message starts a
new episode: policy.reset). Out: /vla/action (the 7-D action inside the limits, its translation cut
so that the hand moves no further out of the workspace box: vla.contracts.action), /vla/gripper,
/vla/cmd_twist (stamped with the camera frame the command was computed from, so commands can be
matched to observations and latency measured), /diagnostics.
~/enable (std_srvs/SetBool) is the e-stop. Whenever an input is missing, stale or invalid, or the
node is disabled, it holds: zero twist and the last gripper command, every control period.

`inference: sync` runs the policy inside the control cycle (a model slower than the period misses
cycles); `inference: async` runs it on a thread of its own and plays its action chunks at the control
rate (vla_ros.chunks), holding also when the chunks run out before a new one arrives. Either way a
closed gripper opens only on the checkpoint's steady request (policies.gripper).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from rclpy.experimental import EventsExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image, Imu, JointState
from std_msgs.msg import Float32MultiArray, Float64, String
from std_srvs.srv import SetBool

from policies import CHECKPOINT_DIR, load_policy
from policies.gripper import GripperLatch
from vla.contracts.action import clip_action, keep_in_workspace
from vla.contracts.observation import STATE_SLICES
from vla.contracts.topics import BASE_FRAME, TOPICS
from vla_ros import params, qos
from vla_ros.chunks import ActionChunks, InferenceThread, Job
from vla_ros.conversions import action_messages, compressed_input, image_input, imu_input, stamp_ns, state_input
from vla_ros.inputs import WRIST, Inputs
from vla_ros.runner import run

PARAMETERS = {
    "policy": ("default", "'random', a checkpoint directory, or the name of a checkpoint in policies/checkpoints"),
    "device": ("cpu", "cpu | cuda | cuda:N"),
    "backend": ("torch", "torch | onnx"),
    "seed": (0, "seed of the random policy"),
    "cpu_threads": (
        0,
        "intra-op threads for CPU inference (torch or onnxruntime); 0: the backend's default "
        "(one per core). On a CPU shared with other nodes, 1 avoids oversubscription (busy-waiting threads)",
    ),
    "control_rate_hz": (10.0, "control rate: the timer trigger's rate, the watchdog's rate, missed-cycle accounting"),
    "trigger": (
        "timer",
        "timer: act every control period on the newest inputs; image: act on each new camera "
        "frame as soon as joint states and IMU at least as new have arrived",
    ),
    "action_rate_hz": (10.0, "rate the policy's per-step deltas were trained at: twist = delta * action_rate_hz"),
    "inference": (
        "sync",
        "sync: the policy acts inside each control cycle; async: the model predicts action chunks on a thread "
        "of its own while the control loop plays them, blended (temporal ensembling), at control_rate_hz",
    ),
    "ensemble_decay": (0.5, "async: weight of a chunk's action = exp(-ensemble_decay * steps since its observation)"),
    "inference_delay": (0.0, "seconds added to every inference: a slower model, for benchmarks only"),
    "max_input_age": (
        0.0,
        "hold when no new message of an input arrived for this long, or one arrives stamped this much "
        "earlier [s]; 0: two control periods",
    ),
    "max_future_stamp": (
        0.1,
        "hold when an input arrives stamped this much ahead of this node's clock [s]: the sender's clock is "
        "not synchronised with ours (or its driver is broken)",
    ),
    "image_transport": (
        "raw",
        "raw: sensor_msgs/Image on camera_topic; "
        "compressed: sensor_msgs/CompressedImage (jpeg/png) on camera_topic + '/compressed'",
    ),
    "frame_id": (BASE_FRAME, "frame of the twist (the robot base)"),
    "autostart": (
        "active",
        "lifecycle state to reach at start: active (configure and activate), inactive "
        "(configure: load the model, then wait for activate), or unconfigured",
    ),
    "diagnostics_period": (1.0, "seconds between /diagnostics messages"),
    "camera_topic": (TOPICS["image"], "camera input"),
    "wrist_camera_topic": (TOPICS["wrist_image"], "wrist camera input, subscribed when the model takes a wrist image"),
    "joint_states_topic": (TOPICS["joint_states"], "joint states input"),
    "imu_topic": (TOPICS["imu"], "IMU input"),
    "instruction_topic": (TOPICS["instruction"], "instruction input (std_msgs/String)"),
    "twist_topic": (TOPICS["cmd_twist"], "end-effector velocity command (geometry_msgs/TwistStamped)"),
    "gripper_topic": (TOPICS["gripper"], "gripper command in [0, 1], 1 = open (std_msgs/Float64)"),
    "action_topic": (TOPICS["action"], "the 7-D action (std_msgs/Float32MultiArray)"),
}


def check(cfg) -> None:
    """Raise ValueError naming the first parameter with an unusable value."""
    choices = {"backend": ("torch", "onnx"), "trigger": ("timer", "image"), "image_transport": ("raw", "compressed"),
               "inference": ("sync", "async")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"parameter {name}={getattr(cfg, name)!r}: use one of {allowed}")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ValueError(f"parameter device={cfg.device!r}: use cpu, cuda or cuda:N")
    positive = {
        "control_rate_hz": cfg.control_rate_hz,
        "action_rate_hz": cfg.action_rate_hz,
        "diagnostics_period": cfg.diagnostics_period,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"parameter {name}={value} must be positive")
    if min(cfg.max_input_age, cfg.max_future_stamp, cfg.cpu_threads, cfg.ensemble_decay, cfg.inference_delay) < 0:
        raise ValueError("parameters max_input_age, max_future_stamp, cpu_threads, ensemble_decay and "
                         "inference_delay must be >= 0")
    if cfg.inference == "async" and cfg.trigger != "timer":
        raise ValueError("parameter inference=async needs trigger=timer (the control loop runs on the timer)")


def resolve_policy(spec: str) -> str:
    """The load_policy() spec for 'random', a checkpoint directory or a shipped checkpoint's name."""
    if spec == "random" or Path(spec).is_dir():
        return spec
    if (CHECKPOINT_DIR / spec).is_dir():
        return str(CHECKPOINT_DIR / spec)
    raise ValueError(f"policy {spec!r} is not 'random', a checkpoint directory, or a checkpoint in {CHECKPOINT_DIR}")


def chunk_predictor(policy):
    """observation -> float32[k, 7] actions inside the limits: a VLA policy's runtime predicts chunks
    (its own chunk execution is left out: the node blends them), another policy acts one step."""
    runtime = getattr(policy, "runtime", None)
    if runtime is not None:
        return lambda observation: runtime.predict(observation)[0]
    return lambda observation: clip_action(policy.act(observation))[None]


def gripper_latch(policy) -> GripperLatch:
    """What opens the gripper when the node blends the chunks: a VLA policy's own latch (its act(),
    which would apply it, is bypassed; its reset() resets it), or one that opens at once."""
    return getattr(policy, "gripper", None) or GripperLatch()


class Stats:
    """Command rate, latency (camera stamp -> command published), inference time and missed control
    cycles (periods without a command while controlling; time spent holding is not counted)."""

    def __init__(self, period_ns: int):
        self.period_ns = period_ns
        self.missed = 0
        self.last_command: int | None = None
        self.latencies: list[float] = []
        self.inference: list[float] = []

    def command(self, now_ns: int, camera_stamp: int) -> None:
        if self.last_command is not None and now_ns - self.last_command > 1.5 * self.period_ns:
            self.missed += round((now_ns - self.last_command) / self.period_ns) - 1
        self.last_command = now_ns
        self.latencies.append((now_ns - camera_stamp) / 1e6)

    def inferred(self, seconds: float) -> None:
        self.inference.append(seconds * 1e3)

    def hold(self) -> None:
        self.last_command = None

    def report(self, period_s: float) -> dict[str, str]:
        """Figures since the previous report."""

        def percentile(values, q):
            return f"{np.percentile(values, q):.2f}" if values else "n/a"

        figures = {
            "rate_hz": f"{len(self.latencies) / period_s:.2f}",
            "latency_p50_ms": percentile(self.latencies, 50),
            "latency_p99_ms": percentile(self.latencies, 99),
            "inference_p50_ms": percentile(self.inference, 50),
            "missed_cycles": str(self.missed),
        }
        self.latencies, self.inference = [], []
        return figures


class PolicyNode(LifecycleNode):
    def __init__(self):
        super().__init__("policy_node")
        self.cfg = params.declare(self, PARAMETERS)
        self.policy = None
        self.spec = None  # what the policy's observations hold (image size, IMU window, wrist camera)
        self.inputs: Inputs | None = None
        self.active = False
        self.enabled = True
        self.failure = ""  # why the last configure failed
        self.hold_kind: str | None = None  # the reason currently held for, logged once per kind
        self.hold_text = ""
        self.gripper: float | None = None  # last gripper command, kept while holding
        self.last_frame = -1  # image trigger: stamp of the last camera frame that triggered a step
        self.chunks: ActionChunks | None = None  # async inference: the chunks played
        self.latch: GripperLatch | None = None  # async inference: when a closed gripper may open
        self.inference: InferenceThread | None = None
        self.episode = 0  # async inference: counts instructions, so that chunks for an older one are dropped
        self.submitted = -1  # async inference: stamp of the last camera frame given to the model
        self.inference_error: str | None = None  # async inference: why the last prediction failed
        self.stats: Stats | None = None
        self.control_timer = None
        self.input_subscriptions: list = []
        self.command_publishers: list = []
        self.diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(SetBool, "~/enable", self.on_enable)
        self.create_timer(self.cfg.diagnostics_period, self.publish_diagnostics)
        if self.cfg.autostart not in ("active", "inactive", "unconfigured"):
            raise ValueError(f"parameter autostart={self.cfg.autostart!r}: use active, inactive or unconfigured")
        if self.cfg.autostart != "unconfigured":
            configured = self.trigger_configure() == TransitionCallbackReturn.SUCCESS
            if configured and self.cfg.autostart == "active":
                self.trigger_activate()

    # ---- lifecycle ---------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = params.read(self, PARAMETERS)
        try:
            check(cfg)
            spec = resolve_policy(cfg.policy)
            self.get_logger().info(f"loading policy {spec} (device {cfg.device}, backend {cfg.backend})")
            policy = load_policy(spec, seed=cfg.seed, device=cfg.device, backend=cfg.backend, threads=cfg.cpu_threads)
        except Exception as exc:  # whatever stops the model from loading: stay up, unconfigured, and say why
            self.failure = f"configure failed: {exc}"
            self.get_logger().error(self.failure)
            return TransitionCallbackReturn.FAILURE
        self.cfg, self.policy, self.failure = cfg, policy, ""
        period_ns = round(1e9 / cfg.control_rate_hz)
        self.spec = policy.spec
        wrist = self.spec.wrist_camera
        max_age = round(cfg.max_input_age * 1e9) or 2 * period_ns
        self.inputs = Inputs(self.spec.imu_window, max_age, round(cfg.max_future_stamp * 1e9), wrist)
        self.stats = Stats(period_ns)
        if cfg.inference == "async":
            self.chunks = ActionChunks(cfg.action_rate_hz, cfg.ensemble_decay)
            self.latch = gripper_latch(policy)
            self.inference = InferenceThread(chunk_predictor(policy), cfg.inference_delay)
        # The instruction subscription comes first: when a new episode's instruction and observation
        # are waiting together, the executor serves subscriptions in creation order.
        image_type, suffix = (Image, "") if cfg.image_transport == "raw" else (CompressedImage, "/compressed")
        sub = self.create_subscription
        self.input_subscriptions = [
            sub(String, cfg.instruction_topic, self.on_instruction, qos.LATCHED_READER),
            sub(image_type, cfg.camera_topic + suffix, self.on_camera, qos.SENSOR),
            sub(JointState, cfg.joint_states_topic, self.on_joint_states, qos.SENSOR),
            sub(Imu, cfg.imu_topic, self.on_imu, qos.SENSOR_QUEUED),
        ]
        if wrist:
            self.input_subscriptions.append(
                sub(image_type, cfg.wrist_camera_topic + suffix, self.on_wrist_camera, qos.SENSOR)
            )
        pub = self.create_lifecycle_publisher
        self.action_pub = pub(Float32MultiArray, cfg.action_topic, qos.RELIABLE)
        self.gripper_pub = pub(Float64, cfg.gripper_topic, qos.RELIABLE)
        self.twist_pub = pub(TwistStamped, cfg.twist_topic, qos.RELIABLE)
        self.command_publishers = [self.action_pub, self.gripper_pub, self.twist_pub]
        self.get_logger().info(
            f"configured: {cfg.trigger} trigger at {cfg.control_rate_hz:g} Hz, "
            f"max input age {self.inputs.max_age_ns / 1e6:.0f} ms"
        )
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers
        self.active, self.hold_kind = True, None
        self.stats.hold()
        self.control_timer = self.create_timer(1.0 / self.cfg.control_rate_hz, self.on_tick)
        self.get_logger().info("active")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.hold("inactive", "deactivated")  # the last command leaves the robot standing still
        self.active = False
        self.destroy_timer(self.control_timer)
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.active:
            self.on_deactivate(state)
        self.release()
        return super().on_shutdown(state)

    def close(self) -> None:
        """At exit: a last zero twist, so the robot does not keep the last velocity."""
        if self.active:
            self.hold("shutdown", "shutting down")

    def release(self) -> None:
        if self.inference is not None:
            self.inference.stop()
        self.inference = self.chunks = self.latch = None
        for subscription in self.input_subscriptions:
            self.destroy_subscription(subscription)
        for publisher in self.command_publishers:
            self.destroy_lifecycle_publisher(publisher)
        self.input_subscriptions, self.command_publishers = [], []
        self.policy = self.inputs = None

    # ---- inputs --------------------------------------------------------------------------------
    def on_instruction(self, msg: String) -> None:
        if not msg.data.strip():
            self.inputs.errors["instruction"] = "empty instruction"
            return
        try:
            self.policy.reset(msg.data)
        except Exception as exc:  # a policy that rejects the text must not take the node down
            self.inputs.errors["instruction"] = f"the policy rejected it: {exc}"
            return
        self.inputs.errors.pop("instruction", None)
        self.inputs.instruction = msg.data
        self.episode += 1
        if self.chunks is not None:
            self.chunks.clear()
        self.get_logger().info(f"instruction: {msg.data!r}")
        unknown = self.policy.unknown_words(msg.data) if hasattr(self.policy, "unknown_words") else []
        if unknown:  # the model still acts on it; what it makes of these words is its guess
            self.get_logger().warning(f"instruction has words the model was not trained on: {', '.join(unknown)}")

    def on_camera(self, msg) -> None:
        self.on_image("camera", msg)

    def on_wrist_camera(self, msg) -> None:
        self.on_image(WRIST, msg)

    def on_image(self, stream: str, msg) -> None:
        convert = image_input if self.cfg.image_transport == "raw" else compressed_input
        self.inputs.update(stream, stamp_ns(msg), self.now_ns(), lambda: convert(msg, self.spec.image_size))
        self.act_on_observation()

    def on_joint_states(self, msg: JointState) -> None:
        self.inputs.update("joint_states", stamp_ns(msg), self.now_ns(), lambda: state_input(msg))
        self.act_on_observation()

    def on_imu(self, msg: Imu) -> None:
        self.inputs.update("imu", stamp_ns(msg), self.now_ns(), lambda: imu_input(msg))
        self.act_on_observation()

    def act_on_observation(self) -> None:
        if self.cfg.trigger == "image" and self.active and self.inputs.synchronized(self.last_frame):
            self.last_frame = self.inputs.stamps["camera"]
            self.control()
        elif self.inference is not None and self.active:
            self.submit()

    # ---- control ---------------------------------------------------------------------------------
    def now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def on_tick(self) -> None:
        """Timer trigger: a control step. Image trigger: the watchdog (steps come with frames)."""
        if self.inference is not None:
            self.play_chunks()
            return
        if self.cfg.trigger == "timer":
            self.control()
            return
        problem = self.problem()
        if problem:
            self.hold(*problem)

    def problem(self) -> tuple[str, str] | None:
        if not self.enabled:
            return "disabled", "disabled by ~/enable (e-stop)"
        return self.inputs.problem(self.now_ns())

    def control(self) -> None:
        problem = self.problem()
        if problem:
            self.hold(*problem)
            return
        camera_stamp = self.inputs.stamps["camera"]
        start = time.perf_counter()
        try:
            time.sleep(self.cfg.inference_delay)  # (0 but in benchmarks)
            action = clip_action(self.policy.act(self.inputs.observation()))
        except Exception as exc:  # a failing policy must stop the robot, not the node
            self.hold("policy:error", f"policy failed: {exc}")
            return
        self.stats.inferred(time.perf_counter() - start)
        self.command(action, camera_stamp)

    def command(self, action: np.ndarray, stamp: int) -> None:
        """Publish an action computed from the observation stamped `stamp`, cut so that the hand, where
        the newest joint states put it, moves no further out of the workspace (the fingertips stay
        off the table)."""
        action = keep_in_workspace(action, self.inputs.values["joint_states"][STATE_SLICES["ee_position"]])
        raw, gripper, twist = action_messages(action, self.cfg.action_rate_hz, stamp, self.cfg.frame_id)
        # Gripper before twist: a lockstep simulator applies the twist with the newest gripper command.
        self.action_pub.publish(raw)
        self.gripper_pub.publish(gripper)
        self.twist_pub.publish(twist)
        self.gripper = float(action[6])
        self.stats.command(self.now_ns(), stamp)
        if self.hold_kind is not None:
            self.get_logger().info("inputs good again: resuming control")
            self.hold_kind = None

    # ---- async inference ---------------------------------------------------------------------------
    def submit(self) -> None:
        """Give the model the newest observation, if it is new, valid and the model is free."""
        if self.inputs.stamps.get("camera", -1) <= self.submitted or self.problem() is not None:
            return
        job = Job(self.episode, self.inputs.stamps["camera"], self.inputs.observation())
        if self.inference.submit(job):
            self.submitted = job.stamp

    def play_chunks(self) -> None:
        """A control step of async inference: take the chunks the model finished, give it the newest
        observation, and command the chunks' action for now, or hold."""
        for job, result, seconds in self.inference.finished():
            self.stats.inferred(seconds)
            if isinstance(result, Exception):  # a failing policy must stop the robot, not the node
                self.chunks.clear()
                self.inference_error = f"policy failed: {result}"
            elif job.episode == self.episode:
                self.chunks.add(job.stamp, result)
                self.inference_error = None
        self.submit()
        problem = self.problem()
        planned = None if problem or self.inference_error else self.chunks.action(self.now_ns())
        if problem:
            self.hold(*problem)
        elif self.inference_error:
            self.hold("policy:error", self.inference_error)
        elif planned is None:
            self.hold("chunk:empty", "no action chunk for now: the model is slower than its chunks last")
        else:
            action, stamp = planned
            self.command(self.latch(action), stamp)

    def hold(self, kind: str, text: str) -> None:
        """Zero twist (stamped now) and the last gripper command."""
        if kind != self.hold_kind:
            self.get_logger().warning(f"holding: {text}")
            self.hold_kind = kind
        self.hold_text = text
        self.stats.hold()
        held = np.zeros(7, dtype=np.float32)
        held[6] = 1.0 if self.gripper is None else self.gripper
        _, gripper, twist = action_messages(held, self.cfg.action_rate_hz, self.now_ns(), self.cfg.frame_id)
        if self.gripper is not None:  # never commanded: leave the gripper as it is
            self.gripper_pub.publish(gripper)
        self.twist_pub.publish(twist)

    def on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self.enabled = bool(request.data)
        self.get_logger().warning("enabled by ~/enable" if self.enabled else "disabled by ~/enable (e-stop)")
        if not self.enabled and self.active:
            self.hold("disabled", "disabled by ~/enable (e-stop)")  # at once, not at the next tick
        response.success = True
        response.message = "enabled" if self.enabled else "disabled: holding"
        return response

    # ---- diagnostics ---------------------------------------------------------------------------------
    def publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name="policy_node: VLA policy", hardware_id=self.get_fully_qualified_name())
        state = "active" if self.active else "inactive" if self.policy is not None else "unconfigured"
        values = {
            "state": state,
            "enabled": str(self.enabled),
            "policy": self.cfg.policy,
            "device": self.cfg.device,
            "backend": self.cfg.backend,
            "trigger": self.cfg.trigger,
            "inference": self.cfg.inference,
            "holding": "",
        }
        if not self.active:
            status.level = DiagnosticStatus.ERROR if self.failure else DiagnosticStatus.STALE
            status.message = self.failure or state
        elif self.hold_kind is not None:
            status.level, status.message = DiagnosticStatus.WARN, f"holding: {self.hold_text}"
            values["holding"] = self.hold_text
        else:
            status.level, status.message = DiagnosticStatus.OK, "controlling"
        if self.stats is not None:
            values |= self.stats.report(self.cfg.diagnostics_period)
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics.publish(array)


def main() -> None:
    # rclpy's C++ events executor: the Python executor's wait-set bookkeeping cost about 3.5 ms of
    # latency per camera frame on 2 CPU cores (benchmarks/ros_latency.py). It cannot serve raw
    # subscriptions (the recorder's), so the other nodes keep the SingleThreadedExecutor.
    run("policy_node", PolicyNode, EventsExecutor)
