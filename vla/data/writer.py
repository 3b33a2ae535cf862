"""Write one episode as a rosbag2 directory (metadata.yaml + zstd-chunked MCAP with CRCs) without ROS."""
from __future__ import annotations

import json
from pathlib import Path

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode, StoragePlugin

from vla.contracts.topics import MSG_TYPES, TOPICS
from vla.data.mcapfile import add_crcs
from vla.data.messages import TYPESTORE, serialize, string_fields
from vla.files import fsync_tree

# metadata.yaml custom_data key holding the episode metadata as JSON (values must be strings)
CUSTOM_DATA_KEY = "vla_episode"


def _latched_qos() -> Qos:
    zero = QosTime(0, 0)  # unspecified: the middleware's default (infinite)
    return Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, zero, zero,
               QosLiveliness.AUTOMATIC, zero, False)


# Latched topics: `ros2 bag play` republishes them so that late subscribers still get them. Other
# topics record no QoS (players use the default: reliable, volatile), which also keeps bags quick to
# open (every recorded profile is YAML that readers parse).
LATCHED = {"instruction", "episode_info"}


class EpisodeWriter:
    """`write(key, stamp_ns, fields)` per message (key from topics.TOPICS), then `close(info)`;
    `abort()` on failure. The bag is complete only after close()."""

    def __init__(self, path: str | Path, wrist_camera: bool = False):
        self.path = Path(path)
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._writer.open()
        keys = [key for key in TOPICS if key != "wrist_image" or wrist_camera]
        self._connections = {
            key: self._writer.add_connection(
                TOPICS[key], MSG_TYPES[key], typestore=TYPESTORE,
                offered_qos_profiles=[_latched_qos()] if key in LATCHED else [])
            for key in keys
        }
        self._last_stamp = 0

    def write(self, key: str, stamp_ns: int, fields: dict) -> None:
        self.write_raw(key, stamp_ns, serialize(MSG_TYPES[key], fields))

    def write_raw(self, key: str, stamp_ns: int, data: bytes) -> None:
        """A message already CDR-encoded, e.g. as a ROS 2 subscription received it."""
        self._writer.write(self._connections[key], int(stamp_ns), data)
        self._last_stamp = max(self._last_stamp, int(stamp_ns))

    def close(self, info: dict) -> None:
        """Store the episode metadata (custom_data and /vla/episode_info), finish the bag, fill in
        the MCAP CRCs that rosbags leaves at 0 (readers verify them) and fsync it, so that a
        completed bag survives a crash that follows."""
        text = json.dumps(info, sort_keys=True)
        self.write("episode_info", self._last_stamp, string_fields(text))
        self._writer.set_custom_data(CUSTOM_DATA_KEY, text)
        self._writer.close()
        for file in self.path.glob("*.mcap"):
            add_crcs(file)
        fsync_tree(self.path)

    def abort(self) -> None:
        self._writer.abort()
