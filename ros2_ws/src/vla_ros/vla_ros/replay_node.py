"""replay_node: publishes a recorded episode's topics with their original timing, like `ros2 bag play`.

Messages go out as the CDR bytes stored in the bag (header stamps are the recorded ones), at their
log times scaled by 1 / rate, from a thread of their own: a sleep to just before each message is
due, then a short spin, so that the timing error stays well under a millisecond on an idle machine.
A second thread reads (and decompresses) the bag ahead. Latched topics (instruction, episode info)
are published transient-local, as recorded. It plays `start_delay` after start (autoplay) and after
each ~/play (std_srvs/Trigger).
"""
from __future__ import annotations

import queue
import sys
import threading
import time

import numpy as np
from rclpy.node import Node
from rosbags.highlevel import AnyReader
from std_srvs.srv import Trigger

from vla.contracts.topics import TOPICS
from vla.data.reader import bag_path
from vla.data.writer import LATCHED
from vla_ros import params, qos
from vla_ros.conversions import message_class
from vla_ros.runner import run

PARAMETERS = {
    "bag": ("", "the episode: a rosbag2 directory or an .mcap file"),
    "rate": (1.0, "playback speed factor"),
    "start_delay": (1.0, "seconds from start (or ~/play) to the first message, for subscribers to connect"),
    "autoplay": (True, "play once at start; otherwise wait for ~/play"),
}
SPIN_S = 0.002  # the last stretch before a message is due is spun, not slept: sleep overshoots
SWITCH_INTERVAL_S = 0.0005  # other threads hold the interpreter at most this long (Python's default: 5 ms)
LATCHED_TOPICS = {TOPICS[key] for key in LATCHED}
_END = object()


class ReplayNode(Node):
    def __init__(self):
        super().__init__("replay_node")
        self.cfg = cfg = params.declare(self, PARAMETERS)
        if not cfg.bag:
            raise ValueError("parameter bag is required: a rosbag2 directory or .mcap file")
        if cfg.rate <= 0:
            raise ValueError(f"parameter rate={cfg.rate} must be positive")
        self.path = bag_path(cfg.bag)
        with AnyReader([self.path]) as reader:
            connections = list(reader.connections)
            self.duration = reader.duration / 1e9 if reader.message_count else 0.0
        self.publishers_by_topic = {}
        for connection in connections:
            if connection.topic in self.publishers_by_topic:
                continue
            profile = qos.LATCHED_WRITER if connection.topic in LATCHED_TOPICS else qos.RELIABLE
            self.publishers_by_topic[connection.topic] = self.create_publisher(
                message_class(connection.msgtype), connection.topic, profile)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.stopping = threading.Event()
        self.player: threading.Thread | None = None
        self.create_service(Trigger, "~/play", self.on_play)
        self.get_logger().info(f"{self.path}: {len(self.publishers_by_topic)} topics, {self.duration:.2f} s")
        if cfg.autoplay:
            self.play()

    def close(self) -> None:
        self.stopping.set()
        if self.player is not None:
            self.player.join()

    def on_play(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success = not self.playing()
        response.message = "already playing" if self.playing() else f"playing {self.path}"
        if response.success:
            self.play()
        return response

    def playing(self) -> bool:
        return self.player is not None and self.player.is_alive()

    def play(self) -> None:
        self.player = threading.Thread(target=self.publish_all, daemon=True)
        self.player.start()

    def read_ahead(self, messages: queue.Queue) -> None:
        with AnyReader([self.path]) as reader:
            for connection, log_time, data in reader.messages():
                if self.stopping.is_set():
                    break
                messages.put((connection.topic, log_time, bytes(data)))
        messages.put(_END)

    def publish_all(self) -> None:
        messages: queue.Queue = queue.Queue(maxsize=1000)
        threading.Thread(target=self.read_ahead, args=(messages,), daemon=True).start()
        start = time.perf_counter() + self.cfg.start_delay
        first, late = None, []
        while not self.stopping.is_set():
            item = messages.get()
            if item is _END:
                break
            topic, log_time, data = item
            first = log_time if first is None else first
            due = start + (log_time - first) / 1e9 / self.cfg.rate
            if due - time.perf_counter() > SPIN_S:
                self.stopping.wait(due - time.perf_counter() - SPIN_S)
            while time.perf_counter() < due:
                pass
            self.publishers_by_topic[topic].publish(data)
            late.append(time.perf_counter() - due)
        if late:
            ms = np.percentile(late, [50, 99]) * 1e3
            self.get_logger().info(f"played {len(late)} messages; publish time error "
                                   f"p50 {ms[0]:.3f} ms, p99 {ms[1]:.3f} ms")


def main() -> None:
    run("replay_node", ReplayNode)
