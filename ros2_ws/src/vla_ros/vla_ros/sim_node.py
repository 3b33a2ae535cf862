"""sim_node: the simulated Panda (sim package) as a ROS 2 node, publishing what a robot's drivers
publish and executing the policy node's commands, so the closed loop runs over ROS 2 without hardware.

Out: the camera (rgb8; and the wrist camera with `wrist_camera`), /joint_states, /imu/data (the
samples of each control step, stamped 1 / imu_hz apart up to the observation's stamp, or closer when
the sim runs faster than real time: each step's samples follow the previous step's), /vla/instruction
(latched), /vla/episode_info (JSON, latched; at the start and at the end of every episode, with its
result; `start_stamp` and `end_stamp` enclose the stamps of every message of the episode: its first
IMU sample, its last observation, and the commands answering them, so that a recorder files messages
by their stamps).
In: /vla/cmd_twist (action delta = twist / control_hz) and /vla/gripper. ~/reset (std_srvs/Trigger)
starts the next episode (next seed); the `instruction` parameter replaces the task's instruction, at
once and on every reset.

Two modes. Real time: a timer at the control rate applies the newest command (zero motion when it is
older than command_timeout). Lockstep (step_on_command): publish an observation, wait for the twist
stamped with that observation's stamp (the policy node stamps commands with the camera frame they
answer) and a gripper command (published with it, unstamped: it may arrive after the twist when the
middleware repairs a lost message), apply them as one control step, publish the next observation:
the loop then reproduces in-process evaluation step for step, whatever the inference time.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
from geometry_msgs.msg import TwistStamped
from rclpy.node import Node
from sensor_msgs.msg import Image, Imu, JointState
from std_msgs.msg import Float64, String
from std_srvs.srv import Trigger

from sim import TASKS, SimConfig, make_env
from vla.contracts import topics as T
from vla.data import messages as M
from vla.data.record import episode_info, versions
from vla_ros import params, qos
from vla_ros.conversions import InputError, command_action, fill, stamp_ns
from vla_ros.runner import run

PARAMETERS = {
    "task": ("reach", f"one of {', '.join(TASKS)}"),
    "seed": (0, "seed of the first episode; each further episode uses the next"),
    "image_size": (96, "camera image size (square)"),
    "wrist_camera": (False, "also render and publish the wrist camera (for models that take it)"),
    "imu_window": (12, "IMU samples of the first observation of an episode (the model's window)"),
    "max_steps": (0, "episode step limit; 0: the task's own"),
    "control_hz": (10, "control steps per second (a divisor of the 240 Hz physics; policies are trained at 10)"),
    "step_on_command": (False, "lockstep: step once per command answering the last observation (see the module doc)"),
    "auto_reset": (True, "start the next episode when one ends; otherwise wait for ~/reset"),
    "start_delay": (1.0, "seconds from start to the first episode, for subscribers to connect [s]"),
    "lockstep_timeout": (2.0, "lockstep: publish the observation again (fresh stamps) when no command has answered "
                              "it for this many seconds, e.g. while the policy node starts [s]"),
    "command_timeout": (0.0, "real time: zero motion when the newest twist is older than this [s]; "
                             "0: two control periods"),
    "instruction": ("", "instruction to publish instead of the task's own; empty: the task's"),
    "camera_topic": (T.TOPICS["image"], "camera output"),
    "wrist_camera_topic": (T.TOPICS["wrist_image"], "wrist camera output (with wrist_camera)"),
    "joint_states_topic": (T.TOPICS["joint_states"], "joint states output"),
    "imu_topic": (T.TOPICS["imu"], "IMU output"),
    "instruction_topic": (T.TOPICS["instruction"], "instruction output (latched)"),
    "episode_topic": (T.TOPICS["episode_info"], "episode info output (std_msgs/String JSON, latched)"),
    "twist_topic": (T.TOPICS["cmd_twist"], "end-effector velocity command input"),
    "gripper_topic": (T.TOPICS["gripper"], "gripper command input"),
}


class SimNode(Node):
    def __init__(self):
        super().__init__("sim_node")
        self.cfg = cfg = params.declare(self, PARAMETERS)
        if cfg.task not in TASKS:
            raise ValueError(f"parameter task={cfg.task!r}: use one of {sorted(TASKS)}")
        sim = SimConfig(image_size=cfg.image_size, wrist_camera=cfg.wrist_camera, imu_window=cfg.imu_window,
                        max_steps=cfg.max_steps, control_hz=cfg.control_hz)  # ValueError: unusable values
        self.env = make_env(cfg.task, sim)
        self.lockstep = cfg.step_on_command
        self.command_timeout_ns = round((cfg.command_timeout or 2 / sim.control_hz) * 1e9)
        self.versions = versions()
        self.next_seed = cfg.seed
        self.episode: dict = {}
        self.running = False
        self.obs: dict = {}
        self.gripper = 1.0  # newest gripper command; the Panda starts open
        self.twist: TwistStamped | None = None  # real time: newest command and when it arrived
        self.twist_time = 0
        self.waiting_for: int | None = None  # lockstep: stamp of the observation awaiting its command
        self.answer: TwistStamped | None = None  # lockstep: its twist, while its gripper command is awaited
        self.gripper_since = False  # lockstep: a gripper command arrived since the observation
        self.last_stamp: int | None = None  # of the newest observation published
        self.published_at = 0.0

        self.image_pub = self.create_publisher(Image, cfg.camera_topic, qos.SENSOR)
        self.wrist_pub = self.create_publisher(Image, cfg.wrist_camera_topic, qos.SENSOR) if cfg.wrist_camera else None
        self.joints_pub = self.create_publisher(JointState, cfg.joint_states_topic, qos.SENSOR)
        self.imu_pub = self.create_publisher(Imu, cfg.imu_topic, qos.SENSOR_QUEUED)
        self.instruction_pub = self.create_publisher(String, cfg.instruction_topic, qos.LATCHED_WRITER)
        self.episode_pub = self.create_publisher(String, cfg.episode_topic, qos.EPISODES)
        # Gripper before twist: a gripper command published just before a twist is handled first.
        self.create_subscription(Float64, cfg.gripper_topic, self.on_gripper, qos.RELIABLE)
        self.create_subscription(TwistStamped, cfg.twist_topic, self.on_twist, qos.RELIABLE)
        self.create_service(Trigger, "~/reset", self.on_reset)
        self.add_post_set_parameters_callback(self.on_parameters)
        if self.lockstep:
            self.create_timer(min(cfg.lockstep_timeout / 4, 0.5), self.on_lockstep_timer)
        else:
            self.create_timer(1.0 / sim.control_hz, self.on_tick)
        self.get_logger().info(f"{cfg.task}: {'lockstep' if self.lockstep else 'real time'} at {sim.control_hz} Hz")
        self.starter = self.create_timer(cfg.start_delay, self.start_episode)

    def close(self) -> None:
        self.env.close()

    # ---- episodes --------------------------------------------------------------------------------
    def start_episode(self) -> None:
        if self.starter is not None:  # the first episode (start_delay, or ~/reset before it)
            self.destroy_timer(self.starter)
            self.starter = None
        seed = self.next_seed
        self.next_seed += 1
        self.obs, _ = self.env.reset(seed=seed)
        self.twist, self.running = None, True
        stamp, samples = self.now(), self.env.imu.take_fresh()
        self.episode = self.episode_info(seed) | {"start_stamp": int(self.imu_stamps(stamp, len(samples))[0])}
        self.publish_episode()
        self.instruction_pub.publish(String(data=self.episode["instruction"]))
        self.publish_observation(samples, stamp)
        self.get_logger().info(f"episode seed {seed}: {self.episode['instruction']!r}")

    def finish_episode(self, success: bool, interrupted: bool = False) -> None:
        self.running, self.waiting_for = False, None
        self.episode |= {"done": True, "success": success, "steps": self.env.steps, "interrupted": interrupted,
                         "end_stamp": self.last_stamp}
        self.publish_episode()
        self.get_logger().info(f"episode seed {self.episode['seed']}: {'success' if success else 'failure'} "
                               f"after {self.env.steps} steps")

    def episode_info(self, seed: int) -> dict:
        """The episode metadata of `vla collect` (vla.data.reader.REQUIRED_INFO and more), plus `done`
        and `lockstep` (then the episode has an action per step)."""
        instruction = self.get_parameter("instruction").value or self.obs["instruction"]
        info = episode_info(self.env, instruction, seed, False, 0, "sim_node")
        return info | {"done": False, "versions": self.versions, "lockstep": self.lockstep}

    def publish_episode(self) -> None:
        self.episode_pub.publish(String(data=json.dumps(self.episode, sort_keys=True)))

    def on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.running:
            self.finish_episode(success=False, interrupted=True)
        self.start_episode()
        response.success = True
        response.message = json.dumps({"seed": self.episode["seed"], "instruction": self.episode["instruction"]})
        return response

    def on_parameters(self, parameters) -> None:
        if any(parameter.name == "instruction" for parameter in parameters) and self.running:
            self.episode["instruction"] = self.get_parameter("instruction").value or self.obs["instruction"]
            self.instruction_pub.publish(String(data=self.episode["instruction"]))
            self.publish_episode()

    # ---- sensors ---------------------------------------------------------------------------------
    def now(self) -> int:
        return self.get_clock().now().nanoseconds

    def imu_stamps(self, stamp: int, count: int) -> np.ndarray:
        """Stamps of `count` IMU samples ending at `stamp`: 1 / imu_hz apart, or closer so that they
        follow the previous observation (a lockstep sim steps faster than real time)."""
        spacing = 1e9 / self.env.config.imu_hz
        if self.last_stamp is not None:
            spacing = min(spacing, (stamp - self.last_stamp) / (count - 0.5))
        return stamp - np.round(np.arange(count - 1, -1, -1) * spacing).astype(np.int64)

    def publish_observation(self, samples: list[np.ndarray], stamp: int | None = None) -> None:
        """IMU `samples`, then joint states, the wrist camera and the camera image (last: a policy
        acting on camera frames then has the rest), all stamped `stamp` (default now; the IMU
        samples up to it)."""
        stamp = self.now() if stamp is None else stamp
        for sample, imu_stamp in zip(samples, self.imu_stamps(stamp, len(samples))):
            self.imu_pub.publish(fill(Imu(), M.imu_fields(sample, int(imu_stamp))))
        self.joints_pub.publish(fill(JointState(), M.joint_state_fields(*self.env.robot.joint_states(), stamp)))
        if self.wrist_pub is not None:
            self.wrist_pub.publish(fill(Image(), M.image_fields(self.obs["wrist_image"], stamp, T.WRIST_CAMERA_FRAME)))
        self.image_pub.publish(fill(Image(), M.image_fields(self.obs["image"], stamp)))
        self.waiting_for = stamp if self.lockstep else None
        self.answer, self.gripper_since = None, False
        self.last_stamp, self.published_at = stamp, time.monotonic()

    # ---- commands --------------------------------------------------------------------------------
    def on_gripper(self, msg: Float64) -> None:
        if math.isfinite(msg.data):
            self.gripper = min(max(msg.data, 0.0), 1.0)
        else:
            self.get_logger().warning(f"ignoring gripper command {msg.data}", throttle_duration_sec=5.0)
        self.gripper_since = True
        if self.answer is not None:
            self.step(self.answer)

    def on_twist(self, msg: TwistStamped) -> None:
        if not self.lockstep:
            self.twist, self.twist_time = msg, self.now()
        elif self.waiting_for is not None and stamp_ns(msg) == self.waiting_for:
            if self.gripper_since:
                self.step(msg)
            else:
                self.answer = msg

    def on_tick(self) -> None:
        """Real time: one control step with the newest command, or zero motion when it is too old."""
        if not self.running:
            return
        age = self.now() - self.twist_time
        self.step(self.twist if self.twist is not None and age <= self.command_timeout_ns else TwistStamped())

    def on_lockstep_timer(self) -> None:
        if self.waiting_for is not None and time.monotonic() - self.published_at > self.cfg.lockstep_timeout:
            self.get_logger().info(
                "no command for the current observation: publishing it again", throttle_duration_sec=10.0
            )
            self.publish_observation(list(self.env.imu.samples))

    def step(self, twist: TwistStamped) -> None:
        self.waiting_for, self.answer = None, None
        try:
            action = command_action(twist, self.gripper, self.env.config.control_hz)
        except InputError as exc:
            self.get_logger().warning(f"ignoring twist: {exc}", throttle_duration_sec=5.0)
            action = np.array([0.0] * 6 + [self.gripper], dtype=np.float32)
        self.obs, _, terminated, truncated, info = self.env.step(action)
        if not (terminated or truncated):
            self.publish_observation(self.env.imu.take_fresh())
            return
        self.finish_episode(bool(info["success"]))
        if self.cfg.auto_reset:
            self.start_episode()


def main() -> None:
    run("sim_node", SimNode)
