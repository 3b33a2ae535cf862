"""recorder_node: records the VLA topics as a dataset of episodes in the format of `vla collect`
(vla.data: one rosbag2 directory per episode, listed in manifest.json when complete), so that
`vla dataset`, the training index, `ros2 bag` and Foxglove read it.

Messages are stored as the CDR bytes received, never re-serialized, with the time the middleware
received them as log time (as `ros2 bag record` does; readers order sensor messages by their header
stamps). Episodes are started and stopped with ~/record (std_srvs/SetBool: true opens a new bag,
false closes it), or, with follow_episodes, follow the episodes a sim_node announces on
/vla/episode_info: the end of an episode closes its bag with the episode's result and opens the next.

The executor serves one message per subscription in turn, so a node that lags behind handles
messages out of their order of arrival. Messages and episode events therefore wait `reorder_window`
seconds and are then applied in the order they were received: each bag gets exactly what arrived
between its start and its end. A bag starts with an observation: commands received before its first
camera image, joint states and IMU sample are left out. An announced episode is kept only if its bag
holds all of its actions and an image and joint states for each; otherwise (the recorder started
during it, messages were lost) it is discarded with a warning.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field

from rclpy.node import Node
from rclpy.serialization import deserialize_message
from std_msgs.msg import String
from std_srvs.srv import SetBool

from vla.contracts.topics import MSG_TYPES, TOPICS
from vla.data.dataset import PARTIAL, DatasetWriter, dir_bytes, episode_name, partial_episode, publish_episode
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
    "reorder_window": (0.5, "seconds messages wait to be written in the order they were received [s]"),
}
# Streams of an episode and how they are received; episode_info is written by the writer on close.
RECORDED = {"image": qos.SENSOR_QUEUED, "wrist_image": qos.SENSOR_QUEUED, "joint_states": qos.SENSOR_QUEUED,
            "imu": qos.RECORDER_IMU, "instruction": qos.LATCHED_READER, "action": qos.RELIABLE,
            "cmd_twist": qos.RELIABLE, "gripper": qos.RELIABLE}
COMMANDS = ("action", "cmd_twist", "gripper")
OBSERVATION = ("image", "joint_states", "imu")
START, STOP, EPISODE = "start", "stop", "episode"  # events, applied in order with the messages


@dataclass
class Bag:
    """The episode being recorded."""

    episode: int
    writer: EpisodeWriter
    counts: dict = field(default_factory=lambda: dict.fromkeys(RECORDED, 0))

    def write(self, key: str, received: int, data: bytes) -> None:
        if key in COMMANDS and not all(self.counts[k] for k in OBSERVATION):
            return
        self.writer.write_raw(key, received, data)
        self.counts[key] += 1


class RecorderNode(Node):
    def __init__(self):
        super().__init__("recorder_node")
        self.cfg = cfg = params.declare(self, PARAMETERS)
        self.dataset = DatasetWriter(cfg.output_dir, log=self.get_logger().info)  # ValueError: unusable directory
        self.next_episode = max((e["episode"] for e in self.dataset.episodes), default=-1) + 1
        self.bag: Bag | None = None
        self.requested = False  # ~/record state, ahead of the bag by the reorder window
        self.pending: list = []  # heap of (received, sequence, key or event, data)
        self.sequence = itertools.count()
        self.instruction: bytes | None = None  # the newest, written at the start of every bag
        if cfg.follow_episodes:
            self.create_subscription(String, cfg.episode_topic, self.on_episode_info, qos.LATCHED_READER)
        for key, profile in RECORDED.items():
            if key != "wrist_image" or cfg.wrist_camera:
                self.create_subscription(message_class(MSG_TYPES[key]), TOPICS[key],
                                         lambda data, info, key=key: self.queue(info["received_timestamp"], key, data),
                                         profile, raw=True)
        self.create_service(SetBool, "~/record", self.on_record)
        self.create_timer(0.05, lambda: self.apply(self.now() - round(cfg.reorder_window * 1e9)))
        mode = f"following {cfg.episode_topic}" if cfg.follow_episodes else "start/stop with ~/record"
        self.get_logger().info(f"recording into {cfg.output_dir} ({mode})")

    def close(self) -> None:
        self.apply(None)
        if self.bag is not None:
            if self.cfg.follow_episodes:  # an episode cut short has no result
                self.discard("shutdown before the episode ended")
            else:
                self.finish(self.robot_info())
        self.dataset.close()
        with contextlib.suppress(OSError):  # not empty: another writer's episode in progress
            (self.dataset.root / PARTIAL).rmdir()

    def now(self) -> int:
        """Wall-clock ns, the clock of the middleware's receive times (the node clock may be sim time)."""
        return time.time_ns()

    # ---- receive order ---------------------------------------------------------------------------
    def queue(self, received: int, what: str, data) -> None:
        heapq.heappush(self.pending, (received, next(self.sequence), what, data))

    def apply(self, until: int | None) -> None:
        """Apply what was received up to `until` (ns; None: everything), in the order received."""
        while self.pending and (until is None or self.pending[0][0] <= until):
            received, _, what, data = heapq.heappop(self.pending)
            if what == START:
                self.start(received)
            elif what == STOP:
                self.finish(self.robot_info())
            elif what == EPISODE:
                if data["done"] and self.bag is not None:
                    self.finish({key: value for key, value in data.items() if key != "done"})
                if self.bag is None:
                    self.start(received)
            else:
                if what == "instruction":
                    self.instruction = data
                if self.bag is not None:
                    self.bag.write(what, received, data)

    # ---- bags ------------------------------------------------------------------------------------
    def start(self, received: int) -> None:
        path = partial_episode(self.dataset.root, self.next_episode)
        self.bag = Bag(self.next_episode, EpisodeWriter(path, self.cfg.wrist_camera))
        self.next_episode += 1
        if self.instruction is not None:  # latched before the episode began
            self.bag.write("instruction", received, self.instruction)
        self.get_logger().info(f"recording {episode_name(self.bag.episode)}")

    def finish(self, info: dict) -> None:
        """Close the bag, move it into the dataset and list it in the manifest."""
        bag, counts = self.bag, self.bag.counts
        if not counts["action"]:
            return self.discard("no actions were recorded")
        if counts["action"] != info["steps"] or min(counts["image"], counts["joint_states"]) < info["steps"]:
            return self.discard(f"{info['steps']} steps, but {counts['action']} actions, {counts['image']} images "
                                f"and {counts['joint_states']} joint states recorded (started during the episode?)")
        info |= {"episode": bag.episode}
        bag.writer.close(info)
        self.bag = None
        name = publish_episode(self.dataset.root, bag.episode)
        self.dataset.add(info | {"path": name, "bytes": dir_bytes(self.dataset.root / name)})
        self.dataset.save()  # list it now: readers use only what the manifest lists
        self.get_logger().info(f"recorded {name}: {counts['action']} actions, success {info['success']}")

    def discard(self, why: str) -> None:
        self.bag.writer.abort()
        shutil.rmtree(partial_episode(self.dataset.root, self.bag.episode), ignore_errors=True)
        self.get_logger().warning(f"discarded {episode_name(self.bag.episode)}: {why}")
        self.bag = None

    def robot_info(self) -> dict:
        """Metadata of an episode recorded through ~/record (no simulator to say seed or success)."""
        instruction = deserialize_message(self.instruction, String).data if self.instruction else ""
        return {"format": FORMAT, "source": "recorder_node", "task": self.cfg.task, "instruction": instruction,
                "seed": None, "success": None, "steps": self.bag.counts["action"], "control_hz": self.cfg.control_hz}

    # ---- callbacks ---------------------------------------------------------------------------------
    def on_episode_info(self, msg: String, message_info) -> None:
        try:
            info = json.loads(msg.data)
        except json.JSONDecodeError as exc:
            info = {"error": str(exc)}
        if not isinstance(info, dict) or not {"done", "steps", "success"} <= info.keys():
            self.get_logger().warning(f"ignoring episode info {msg.data[:80]!r}: not JSON with done, steps, success")
            return
        self.queue(message_info["received_timestamp"], EPISODE, info)

    def on_record(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data == self.requested:
            response.success, response.message = False, "already recording" if request.data else "not recording"
            return response
        self.requested = request.data
        self.queue(self.now(), START if request.data else STOP, None)
        response.success = True
        response.message = ("recording (from now)" if request.data else
                            "stopped: the episode is listed in the manifest once written")
        return response


def main() -> None:
    run("recorder_node", RecorderNode)
