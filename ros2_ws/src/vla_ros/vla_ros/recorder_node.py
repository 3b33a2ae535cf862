"""recorder_node: records the VLA topics as a dataset of episodes in the format of `vla collect`
(vla.data: one rosbag2 directory per episode, listed in manifest.json when complete), so that
`vla dataset`, the training index, `ros2 bag` and Foxglove read it.

Messages are stored as the CDR bytes received, never re-serialized, with the time the middleware
received them as log time (as `ros2 bag record` does; readers order sensor messages by their header
stamps). Episodes are started and stopped with ~/record (std_srvs/SetBool: true opens a new bag,
false closes it), or, with follow_episodes, follow the episodes a sim_node announces on
/vla/episode_info.

Messages go to episodes by their header stamps, never by when they arrive, so that a recorder that
falls behind (a busy CPU, a bag being compressed) delays an episode but never misfiles or drops one:
- an episode spans the stamps from its start to its end: those sim_node announces (start_stamp,
  end_stamp), or this node's clock at the ~/record calls;
- /vla/action and /vla/gripper have no header: an action goes with the twist commanding it (velocity
  = the action's delta times a rate), a gripper command with the first twist received after it (the
  policy node publishes the action, the gripper command, then the twist stamped with the camera frame
  they answer); each is logged with its twist's receive time;
- an episode is closed once every stream has delivered a message stamped after its end (each stream
  arrives in order), or has been silent for `settle_time`. A followed episode is kept if it holds an
  image, joint states and an IMU sample (at least) for each step and all its actions (lockstep: one per
  step); otherwise (the recorder started during it, messages were lost) it is discarded with a warning.
  A robot episode is kept if it holds actions: a timer-triggered policy may answer one frame twice.
A followed episode's messages wait in memory until it ends (its end is not known before); a robot
episode's are written as they arrive. A followed episode's bag starts with its announced instruction.
At a stop (SIGINT, SIGTERM) the messages its readers hold already are received before the episode is
closed. It logs each publisher it finds or loses per topic: a stream whose publisher it has not
discovered yet is not recorded.
"""
from __future__ import annotations

import bisect
import functools
import json
import shutil
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from geometry_msgs.msg import TwistStamped
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Float32MultiArray, String
from std_srvs.srv import SetBool

from vla.contracts.topics import MSG_TYPES, TOPICS
from vla.data.dataset import DatasetWriter, dir_bytes, episode_name, partial_episode, publish_episode
from vla.data.record import FORMAT
from vla.data.writer import EpisodeWriter
from vla_ros import params, qos
from vla_ros.conversions import message_class
from vla_ros.runner import run

PARAMETERS = {
    "output_dir": ("episodes", "dataset directory (created; an existing dataset is appended to)"),
    "follow_episodes": (False, "record the episodes announced on episode_topic (sim_node), one bag each"),
    "episode_topic": (TOPICS["episode_info"], "episode announcements followed with follow_episodes"),
    "task": ("robot", "task name stored with episodes recorded through ~/record"),
    "control_hz": (10, "control rate stored with episodes recorded through ~/record"),
    "wrist_camera": (False, "also record the wrist camera"),
    "settle_time": (0.5, "an episode closes once every stream moved past its end or was silent this long [s]"),
}
# Streams of an episode and how they are received; episode_info is written by the writer on close.
RECORDED = {"image": qos.SENSOR_QUEUED, "wrist_image": qos.SENSOR_QUEUED, "joint_states": qos.SENSOR_QUEUED,
            "imu": qos.RECORDER_IMU, "instruction": qos.LATCHED_READER, "action": qos.RECORDER_COMMANDS,
            "cmd_twist": qos.RECORDER_COMMANDS, "gripper": qos.RECORDER_COMMANDS}
UNSTAMPED = ("action", "gripper")  # filed with the stamp of their twist
OBSERVATION = ("image", "joint_states", "imu")
TICK_S = 0.05
EARLY_LIMIT = 20_000  # messages of an episode not announced yet, kept for when it is
TAKE_AT_ONCE = 100
DRAIN_S = 0.8  # at a stop, for the messages the readers hold (of runner.WORK_DEADLINE_S)
PAIR_WINDOW_NS = 2_000_000_000  # an action and its twist arrive at most this far apart


def commands(velocity: np.ndarray, delta: np.ndarray) -> bool:
    """Whether a twist's velocity is this action delta times a positive rate."""
    if not delta.any():
        return not velocity.any()
    rate = velocity @ delta / (delta @ delta)
    return rate > 0 and np.allclose(velocity, delta * rate, rtol=1e-6, atol=1e-12)


def header_stamp(data: bytes) -> int:
    """The header stamp [ns] of a CDR-encoded message that starts with a std_msgs/Header."""
    order = "little" if data[1] else "big"  # CDR encapsulation: 0x0001 little endian, 0x0000 big
    return int.from_bytes(data[4:8], order, signed=True) * 1_000_000_000 + int.from_bytes(data[8:12], order)


@dataclass
class Twist:
    received: int
    stamp: int
    velocity: np.ndarray  # linear, angular
    answered: bool = False  # an action was paired with it


@dataclass
class Episode:
    """An announced (followed) or requested (~/record) episode: stamps [start, end], end None while running."""

    number: int
    start: int
    info: dict  # followed: the announcement (with the result once done); robot: instruction
    end: int | None = None
    messages: list = field(default_factory=list)  # followed: (received, stamp, key, data), written at the end
    writer: EpisodeWriter | None = None  # robot: written as they arrive
    counts: dict = field(default_factory=lambda: dict.fromkeys(RECORDED, 0))

    def covers(self, stamp: int) -> bool:
        return self.start <= stamp and (self.end is None or stamp <= self.end)

    def add(self, received: int, stamp: int, key: str, data: bytes) -> None:
        if self.writer is None:
            self.messages.append((received, stamp, key, data))
        elif key in ("instruction",) + OBSERVATION or all(self.counts[k] for k in OBSERVATION):
            self.writer.write_raw(key, received, data)  # (a robot's commands once it has an observation)
        else:
            return
        self.counts[key] += 1


class RecorderNode(Node):
    def __init__(self):
        super().__init__("recorder_node")
        self.cfg = cfg = params.declare(self, PARAMETERS)
        self.dataset = DatasetWriter(cfg.output_dir, log=self.get_logger().info)  # ValueError: unusable directory
        self.next_episode = max((e["episode"] for e in self.dataset.episodes), default=-1) + 1
        self.episodes: list[Episode] = []  # running or ended, not written yet; by start
        self.keys = [key for key in RECORDED if key != "wrist_image" or cfg.wrist_camera]
        self.newest: dict[str, int] = {}  # stamp of the newest message filed, per stream
        self.silent = dict.fromkeys(self.keys, 0)  # timer ticks since a stream's last message
        self.twists: list[Twist] = []  # recent twists, for action and gripper commands
        self.unpaired: list[tuple[int, str, bytes]] = []  # actions and grippers waiting for their twist
        self.early: deque = deque(maxlen=EARLY_LIMIT)  # followed: messages stamped after every known episode
        self.instruction: bytes | None = None  # robot: the newest, written at the start of every bag
        self.started = self.now()
        if cfg.follow_episodes:
            self.create_subscription(String, cfg.episode_topic, self.on_episode_info, qos.EPISODES)
        self.readers = {key: self.create_subscription(
            message_class(MSG_TYPES[key]), TOPICS[key], functools.partial(self.on_message, key), RECORDED[key],
            raw=True, event_callbacks=SubscriptionEventCallbacks(matched=functools.partial(self.on_matched, key)))
            for key in self.keys}
        self.create_service(SetBool, "~/record", self.on_record)
        self.create_timer(TICK_S, self.on_tick)
        mode = f"following {cfg.episode_topic}" if cfg.follow_episodes else "start/stop with ~/record"
        self.get_logger().info(f"recording into {cfg.output_dir} ({mode})")

    def close(self) -> None:
        self.drain()
        self.pair()
        for episode in list(self.episodes):
            if episode.end is not None or not self.cfg.follow_episodes:
                episode.end = episode.end or self.now()
                self.finish(episode)
            else:
                self.discard(episode, "shutdown before the episode ended")
        self.dataset.close()  # and its .partial/, once empty

    def now(self) -> int:
        return self.get_clock().now().nanoseconds

    def on_matched(self, key: str, info) -> None:
        """Say which streams are received (as `ros2 bag record` does): a topic whose publisher was not
        discovered yet is not recorded."""
        change = "found" if info.current_count_change > 0 else "lost"
        self.get_logger().info(f"{TOPICS[key]}: {change} a publisher ({info.current_count} now)")

    # ---- messages ----------------------------------------------------------------------------------
    def on_message(self, key: str, data: bytes, info) -> None:
        """A message, and the others waiting on its subscription (at most TAKE_AT_ONCE): the executor
        takes one per subscription and round, too few for the IMU (12 per control step) when the
        recorder has fallen behind, and a reader's queue drops its oldest messages when full."""
        self.receive(key, data, info["received_timestamp"])
        self.take(key, TAKE_AT_ONCE)

    def drain(self) -> None:
        """Receive what the readers hold already (a recorder behind a busy CPU can hold a second of an
        episode there at a stop), for at most DRAIN_S of the stop deadline."""
        deadline = time.monotonic() + DRAIN_S
        for key in self.readers:
            self.take(key, RECORDED[key].depth, deadline)  # a KEEP_LAST reader holds at most its depth

    def take(self, key: str, most: int, deadline: float = float("inf")) -> None:
        reader = self.readers[key]
        with reader.handle:  # as the executor takes a message
            for _ in range(most):
                taken = reader.handle.take_message(reader.msg_type, True) if time.monotonic() < deadline else None
                if taken is None:
                    break
                self.receive(key, taken[0], taken[1]["received_timestamp"])

    def receive(self, key: str, data: bytes, received: int) -> None:
        self.silent[key] = 0
        if key == "instruction":
            self.instruction = data
            if not self.cfg.follow_episodes:  # (a followed episode's instruction is announced)
                self.file(received, self.now(), key, data)
        elif key in UNSTAMPED:
            self.unpaired.append((received, key, data))
        else:
            stamp = header_stamp(data)
            if key == "cmd_twist":
                velocity = deserialize_message(data, TwistStamped).twist
                self.twists.append(Twist(received, stamp, np.array([getattr(getattr(velocity, part), axis)
                                                                   for part in ("linear", "angular")
                                                                   for axis in "xyz"])))
            self.file(received, stamp, key, data)

    def pair(self) -> None:
        """File each action and gripper command with its twist's stamp and receive time (logged with
        it, a reader pairs them even from a burst of commands), once its twist is here."""
        waiting = []
        for received, key, data in self.unpaired:
            twist = self.action_twist(received, data) if key == "action" else self.next_twist(received)
            if twist is None:
                waiting.append((received, key, data))
            else:
                self.file(twist.received, twist.stamp, key, data)
        self.unpaired = waiting
        del self.twists[:-1000]  # plenty for the commands still waiting

    def next_twist(self, received: int) -> Twist | None:
        """The first twist received at or after `received` (the policy node publishes the action, the
        gripper command, then the twist)."""
        index = bisect.bisect_left([twist.received for twist in self.twists], received)
        return self.twists[index] if index < len(self.twists) else None

    def action_twist(self, received: int, data: bytes) -> Twist | None:
        """The twist commanding this action (its velocity is the action's delta times the policy's
        rate): a message repaired by the middleware can arrive after later ones of other topics, so
        receive order alone may pair an action with the next step's twist. Without one within
        PAIR_WINDOW_NS, the next twist received."""
        delta = np.asarray(deserialize_message(data, Float32MultiArray).data[:6], dtype=np.float64)
        for twist in self.twists:
            if not twist.answered and twist.received >= received - PAIR_WINDOW_NS and commands(twist.velocity, delta):
                twist.answered = True
                return twist
        if self.twists and self.twists[-1].received > received + PAIR_WINDOW_NS:
            return self.next_twist(received)
        return None

    def file(self, received: int, stamp: int, key: str, data: bytes) -> None:
        """Give a message to the episode whose stamps enclose its stamp; keep it for an episode not
        announced yet; otherwise it belongs to none being recorded."""
        self.newest[key] = max(stamp, self.newest.get(key, stamp))
        for episode in self.episodes:
            if episode.covers(stamp):
                episode.add(received, stamp, key, data)
                return
        last = self.episodes[-1] if self.episodes else None
        if self.cfg.follow_episodes and (last is None or (last.end is not None and stamp > last.end)):
            self.early.append((received, stamp, key, data))

    def on_tick(self) -> None:
        for key in self.silent:
            self.silent[key] += 1
        self.pair()
        for episode in list(self.episodes):
            if episode.end is not None and all(self.passed(key, episode.end) for key in self.keys):
                self.finish(episode)

    def passed(self, key: str, end: int) -> bool:
        """Nothing more of stream `key` will come for an episode ending at `end` (the instruction is
        not a stream: it is filed when it arrives)."""
        return (key == "instruction" or self.newest.get(key, end) > end
                or self.silent[key] * TICK_S >= self.cfg.settle_time)

    # ---- episodes ------------------------------------------------------------------------------------
    def begin(self, start: int, info: dict) -> Episode:
        """A new episode; a robot's bag is opened at once."""
        writer = None
        if not self.cfg.follow_episodes:
            writer = EpisodeWriter(partial_episode(self.dataset.root, self.next_episode), self.cfg.wrist_camera)
        episode = Episode(self.next_episode, start, info, writer=writer)
        self.next_episode += 1
        self.episodes.append(episode)
        self.get_logger().info(f"recording {episode_name(episode.number)}")
        return episode

    def on_episode_info(self, msg: String, message_info) -> None:
        try:
            info = json.loads(msg.data)
        except json.JSONDecodeError as exc:
            info = {"error": str(exc)}
        required = {"done", "steps", "success", "seed", "instruction", "start_stamp"}
        if not isinstance(info, dict) or not required <= info.keys() or (info["done"] and "end_stamp" not in info):
            self.get_logger().warning(f"ignoring episode info {msg.data[:80]!r}: not JSON with {sorted(required)} "
                                      "(and end_stamp when done)")
            return
        received = message_info["received_timestamp"]
        running = next((e for e in self.episodes if e.end is None and e.info["seed"] == info["seed"]), None)
        if info["done"]:
            if running is not None:
                self.end(running, info)
            return
        if running is None and info["start_stamp"] < self.started:
            self.get_logger().info(f"episode seed {info['seed']} began before the recorder: not recorded")
            return
        if running is None:
            stale = [e for e in self.episodes if e.end is None]  # its end was never announced (sim restarted)
            for episode in stale:
                self.discard(episode, "the next episode began before its end was announced")
            running = self.begin(info["start_stamp"], info)
            early, self.early = list(self.early), deque(maxlen=EARLY_LIMIT)
            for message in early + [m for episode in stale for m in episode.messages]:
                self.file(*message)
        running.info = info  # the start, or a new instruction
        instruction = serialize_message(String(data=info["instruction"]))
        running.add(received, info["start_stamp"], "instruction", instruction)

    def end(self, episode: Episode, info: dict) -> None:
        """The announced end of a followed episode; its messages stamped later belong to the next."""
        episode.end, episode.info = info["end_stamp"], info
        later = [m for m in episode.messages if m[1] > episode.end]
        episode.messages = [m for m in episode.messages if m[1] <= episode.end]
        for message in later:
            episode.counts[message[2]] -= 1
            self.file(*message)

    def finish(self, episode: Episode) -> None:
        """Write and list the episode, or discard it if incomplete."""
        self.episodes.remove(episode)
        info, counts = self.result(episode), episode.counts
        if not counts["action"]:
            held = ", ".join(f"{count} {key}" for key, count in counts.items() if count)
            return self.discard(episode, f"no actions were recorded (it holds {held or 'nothing'})")
        steps = info["steps"]
        lockstep_short = info.get("lockstep") and counts["action"] != steps
        # Only a followed episode has an observation per step (module docstring); a robot's bag holds its
        # commands once it has every observation stream (Episode.add).
        if self.cfg.follow_episodes and (lockstep_short or min(counts[key] for key in OBSERVATION) < steps):
            recorded = ", ".join(f"{counts[key]} {key}" for key in ("action",) + OBSERVATION)
            return self.discard(episode, f"{steps} steps, but {recorded} messages recorded (started during it, "
                                         "or messages lost?)")
        writer = episode.writer or self.write_bag(episode)
        writer.close(info)
        name = publish_episode(self.dataset.root, episode.number)
        self.dataset.add(info | {"path": name, "bytes": dir_bytes(self.dataset.root / name)})
        self.dataset.save()  # list it now: readers use only what the manifest lists
        self.get_logger().info(f"recorded {name}: {counts['action']} actions, success {info['success']}")

    def write_bag(self, episode: Episode) -> EpisodeWriter:
        writer = EpisodeWriter(partial_episode(self.dataset.root, episode.number), self.cfg.wrist_camera)
        for received, _, key, data in sorted(episode.messages, key=lambda m: m[0]):
            writer.write_raw(key, received, data)
        return writer

    def result(self, episode: Episode) -> dict:
        """The episode's metadata: the followed sim's announcement, or a robot episode's."""
        if self.cfg.follow_episodes:
            return {key: value for key, value in episode.info.items() if key != "done"} | {"episode": episode.number}
        latched = episode.info["instruction"]
        instruction = deserialize_message(latched, String).data if latched else ""
        return {"format": FORMAT, "source": "recorder_node", "task": self.cfg.task, "instruction": instruction,
                "seed": None, "success": None, "steps": episode.counts["action"], "control_hz": self.cfg.control_hz,
                "episode": episode.number}

    def discard(self, episode: Episode, why: str) -> None:
        if episode in self.episodes:
            self.episodes.remove(episode)
        if episode.writer is not None:
            episode.writer.abort()
            shutil.rmtree(partial_episode(self.dataset.root, episode.number), ignore_errors=True)
        self.get_logger().warning(f"discarded {episode_name(episode.number)}: {why}")

    def on_record(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        running = next((e for e in self.episodes if e.end is None), None)
        if self.cfg.follow_episodes or request.data == (running is not None):
            response.success = False
            response.message = ("following episodes" if self.cfg.follow_episodes else
                                "already recording" if request.data else "not recording")
            return response
        if request.data:
            episode = self.begin(self.now(), {"instruction": self.instruction})
            if self.instruction is not None:  # latched before the episode began
                episode.add(time.time_ns(), episode.start, "instruction", self.instruction)
        else:
            running.end = self.now()
        response.success = True
        response.message = ("recording (from now)" if request.data else
                            "stopped: the episode is listed in the manifest once written")
        return response


def main() -> None:
    run("recorder_node", RecorderNode)
