"""recorder_node: records the VLA topics as a dataset of episodes in the format of `vla collect`
(vla.episodes: one rosbag2 directory per episode, listed in manifest.json when complete), so that
`vla dataset`, the training index, `ros2 bag` and Foxglove read it.

Messages are stored as the CDR bytes received, never re-serialized, with the receive time as log
time (as `ros2 bag record` does; readers order sensor messages by their header stamps). Episodes are
started and stopped with ~/record (std_srvs/SetBool: true opens a new bag, false closes it), or, with
follow_episodes, follow the episodes a sim_node announces on /vla/episode_info (one bag per episode,
closed with the episode's result).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from rclpy.node import Node
from rclpy.serialization import deserialize_message
from std_msgs.msg import String
from std_srvs.srv import SetBool

from vla.episodes.dataset import PARTIAL, DatasetWriter, dir_bytes, episode_name
from vla.episodes.record import FORMAT
from vla.episodes.topics import MSG_TYPES, TOPICS
from vla.episodes.writer import EpisodeWriter, fsync_dir
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
}
# Streams of an episode and how they are received; episode_info is written by the writer on close.
RECORDED = {"image": qos.SENSOR_QUEUED, "wrist_image": qos.SENSOR_QUEUED, "joint_states": qos.SENSOR_QUEUED,
            "imu": qos.SENSOR_QUEUED, "instruction": qos.LATCHED_READER, "action": qos.RELIABLE,
            "cmd_twist": qos.RELIABLE, "gripper": qos.RELIABLE}


class RawEpisodeWriter(EpisodeWriter):
    """EpisodeWriter that also takes messages as received (CDR bytes).
    TODO(episodes): move write_raw into EpisodeWriter and drop this class."""

    def write_raw(self, key: str, stamp_ns: int, data: bytes) -> None:
        self._writer.write(self._connections[key], stamp_ns, data)
        self._last_stamp = max(self._last_stamp, stamp_ns)


class RecorderNode(Node):
    def __init__(self):
        super().__init__("recorder_node")
        self.cfg = cfg = params.declare(self, PARAMETERS)
        self.dataset = DatasetWriter(cfg.output_dir, log=self.get_logger().info)  # ValueError: unusable directory
        self.writer: RawEpisodeWriter | None = None
        self.episode: dict = {}  # the open episode: id, path, announced metadata
        self.counts: dict[str, int] = {}
        self.instruction: bytes | None = None  # the newest, written at the start of every bag
        if cfg.follow_episodes:
            self.create_subscription(String, cfg.episode_topic, self.on_episode_info, qos.LATCHED_READER)
        for key, profile in RECORDED.items():
            if key != "wrist_image" or cfg.wrist_camera:
                self.create_subscription(message_class(MSG_TYPES[key]), TOPICS[key],
                                         lambda data, key=key: self.on_message(key, data), profile, raw=True)
        self.create_service(SetBool, "~/record", self.on_record)
        mode = f"following {cfg.episode_topic}" if cfg.follow_episodes else "start/stop with ~/record"
        self.get_logger().info(f"recording into {cfg.output_dir} ({mode})")

    def close(self) -> None:
        if self.writer is not None:
            if self.cfg.follow_episodes:  # an episode cut short has no result
                self.discard("shutdown before the episode ended")
            else:
                self.stop(self.robot_info())
        self.dataset.close()

    # ---- episodes ------------------------------------------------------------------------------
    def start(self, announced: dict | None = None) -> None:
        ids = [e["episode"] for e in self.dataset.episodes]
        episode = max(ids, default=-1) + 1
        path = self.dataset.root / PARTIAL / episode_name(episode)
        shutil.rmtree(path, ignore_errors=True)
        self.writer = RawEpisodeWriter(path, self.cfg.wrist_camera)
        self.episode = {"episode": episode, "path": path, "announced": announced or {}}
        self.counts = dict.fromkeys(RECORDED, 0)
        if self.instruction is not None:  # published (latched) before the episode began
            self.write("instruction", self.instruction)
        self.get_logger().info(f"recording {episode_name(episode)}")

    def stop(self, info: dict) -> str:
        """Close the bag with `info`, move it into the dataset and list it; returns its name."""
        if not self.counts["action"]:
            self.discard("no actions were recorded")
            return ""
        name, partial = episode_name(self.episode["episode"]), self.episode["path"]
        self.writer.close(info | {"episode": self.episode["episode"]})
        self.writer = None
        os.rename(partial, self.dataset.root / name)
        fsync_dir(self.dataset.root)
        self.dataset.add(info | {"episode": self.episode["episode"], "path": name,
                                 "bytes": dir_bytes(self.dataset.root / name)})
        self.dataset.save()  # list it now: readers use only what the manifest lists
        self.get_logger().info(f"recorded {name}: {self.counts['action']} actions, success {info['success']}")
        return name

    def discard(self, why: str) -> None:
        self.writer.abort()
        shutil.rmtree(self.episode["path"], ignore_errors=True)
        self.writer = None
        self.get_logger().warning(f"discarded {episode_name(self.episode['episode'])}: {why}")

    def robot_info(self) -> dict:
        """Metadata of an episode recorded through ~/record (no simulator to say seed or success)."""
        instruction = deserialize_message(self.instruction, String).data if self.instruction else ""
        return {"format": FORMAT, "source": "recorder_node", "task": self.cfg.task, "instruction": instruction,
                "seed": None, "success": None, "steps": self.counts["action"], "control_hz": self.cfg.control_hz}

    # ---- callbacks ---------------------------------------------------------------------------------
    def on_message(self, key: str, data: bytes) -> None:
        if key == "instruction":
            self.instruction = data
        if self.writer is not None:
            self.write(key, data)

    def write(self, key: str, data: bytes) -> None:
        self.writer.write_raw(key, self.get_clock().now().nanoseconds, data)
        self.counts[key] += 1

    def on_episode_info(self, msg: String) -> None:
        try:
            info = json.loads(msg.data)
            seed, done = info["seed"], info["done"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            self.get_logger().warning(f"ignoring episode info {msg.data[:80]!r}: {exc}")
            return
        if not done:
            if self.writer is not None:
                self.discard("a new episode started before it ended")
            self.start(info)
        elif self.writer is not None and self.episode["announced"].get("seed") == seed:
            self.stop({key: value for key, value in info.items() if key != "done"})

    def on_record(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data == (self.writer is not None):
            response.success = False
            response.message = "already recording" if request.data else "not recording"
            return response
        if request.data:
            self.start()
            response.message = f"recording {episode_name(self.episode['episode'])}"
        else:
            name = self.stop(self.robot_info())
            response.message = f"recorded {name}" if name else "discarded: no actions were recorded"
        response.success = True
        return response


def main() -> None:
    sys.exit(run("recorder_node", RecorderNode))
