"""The policy node's inputs and their watchdog: the newest valid message of each stream, and the
reason the policy must hold (an input missing, stale or invalid), if there is one.

Ages are measured on the node's own clock from when a message arrived, never from its header stamp:
a sender's clock may run ahead, and a stream stamped in the future would otherwise never go stale.
A stamp far from the node's clock on arrival (ahead, or already too old) makes the stream invalid."""
from __future__ import annotations

from collections import deque

import numpy as np

from vla_ros.conversions import InputError

STREAMS = ("camera", "joint_states", "imu")
WRIST = "wrist_camera"  # a stream only for models that take a wrist camera image


class Inputs:
    def __init__(self, imu_window: int, max_age_ns: int, max_ahead_ns: int, wrist_camera: bool = False):
        self.max_age_ns = max_age_ns
        self.max_ahead_ns = max_ahead_ns
        self.streams = STREAMS + ((WRIST,) if wrist_camera else ())
        self.values: dict[str, np.ndarray] = {}  # camera, wrist_camera: model images; joint_states: state
        self.imu: deque[np.ndarray] = deque(maxlen=imu_window)
        self.stamps: dict[str, int] = {}  # header stamp of the newest valid message per stream, ns
        self.received: dict[str, int] = {}  # when it arrived, on the node's clock, ns
        self.errors: dict[str, str] = {}  # why the newest message of a stream (or instruction) was rejected
        self.instruction: str | None = None

    def update(self, stream: str, stamp: int, now_ns: int, convert) -> bool:
        """Take a stream's new message, stamped `stamp` and arriving at `now_ns`, through `convert()`;
        a stamp too far from `now_ns` or an InputError marks the stream invalid until its next good
        message. Returns whether the message was good."""
        try:
            self.check_stamp(stamp, now_ns)
            value = convert()
        except InputError as exc:
            self.errors[stream] = str(exc)
            return False
        self.errors.pop(stream, None)
        if stream == "imu":
            self.imu.append(value)
        else:
            self.values[stream] = value
        self.stamps[stream], self.received[stream] = stamp, now_ns
        return True

    def check_stamp(self, stamp: int, now_ns: int) -> None:
        lag = now_ns - stamp
        if lag < -self.max_ahead_ns:
            raise InputError(f"stamped {-lag / 1e6:.0f} ms ahead of this node's clock (limit "
                             f"{self.max_ahead_ns / 1e6:.0f} ms): are the clocks synchronised?")
        if lag > self.max_age_ns:
            raise InputError(f"stamped {lag / 1e6:.0f} ms before it arrived (limit {self.max_age_ns / 1e6:.0f} ms)")

    def problem(self, now_ns: int) -> tuple[str, str] | None:
        """(kind, text) of the first reason to hold, or None. `kind` stays the same while the reason
        persists (the node logs each kind once); `text` is for people."""
        for stream in ("instruction",) + self.streams:
            if stream in self.errors:
                return f"{stream}:invalid", f"{stream}: {self.errors[stream]}"
        if self.instruction is None:
            return "instruction:missing", "no instruction received"
        for stream in self.streams:
            if stream not in self.received:
                return f"{stream}:missing", f"no {stream} message received"
            age = now_ns - self.received[stream]
            if age > self.max_age_ns:
                return f"{stream}:stale", (f"{stream} is stale: the newest arrived {age / 1e6:.0f} ms ago "
                                           f"(limit {self.max_age_ns / 1e6:.0f} ms)")
        if len(self.imu) < self.imu.maxlen:
            return "imu:window", f"IMU window has {len(self.imu)} of {self.imu.maxlen} samples"
        return None

    def synchronized(self, after_ns: int) -> bool:
        """A camera frame newer than `after_ns` has arrived, and the other streams at least as new."""
        image = self.stamps.get("camera", -1)
        return image > after_ns and min(self.stamps.get(stream, -1) for stream in self.streams) >= image

    def observation(self) -> dict:
        obs = {"image": self.values["camera"], "state": self.values["joint_states"],
               "imu": np.asarray(self.imu, dtype=np.float32), "instruction": self.instruction}
        if WRIST in self.streams:
            obs["wrist_image"] = self.values[WRIST]
        return obs
